"""Ahead-of-time compile check (``fastmam.kernels.aot``): every Triton specialization the presets launch compiles
to cubin for sm_80 and sm_90 on this GPU-less machine, without spills; the check compiles what the launchers launch.

The compiles run in worker processes without TRITON_INTERPRET (conftest sets it for the CPU tests), into a fresh
Triton cache of this module: ~1.5 min on 2 cores for all specializations x 2 archs.
"""

import ast
import dataclasses
import importlib.util
import json
import pathlib
import re

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install -e '.[test]')")

ARCHS = (80, 90)
KERNELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "kernels"


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("triton_cache")))
        yield


@pytest.fixture(scope="module")
def specs():
    from fastmam.kernels import aot

    return aot.specializations()


def _copy_rows_variant(specs, block_d, num_warps):
    """A token copy specialization with another block and warps: 8192 fp32 values per thread of one warp spill;
    a block of 1000 (not a power of 2), which the interpreter runs, does not compile."""
    base = next(s for s in specs if s.name == "_copy_rows_kernel" and dict(s.signature)["src_ptr"] == "*fp32")
    index = base.signature.index(("BLOCK_D", "constexpr"))
    constexprs = tuple((i, block_d if i == index else v) for i, v in base.constexprs)
    return dataclasses.replace(base, constexprs=constexprs, num_warps=num_warps, sources=("test variant",))


@pytest.fixture(scope="module")
def results(specs, triton_cache):
    """Every specialization, and the two bad variants, compiled once per arch (other tests then hit the cache)."""
    from fastmam.kernels import aot

    return aot.compile_all([*specs, _copy_rows_variant(specs, 8192, 1), _copy_rows_variant(specs, 1000, 4)], ARCHS)


def _jit_kernels() -> dict[str, set[str]]:
    """Module -> names of the @triton.jit functions named ``*_kernel`` (launched kernels, not helpers)."""
    out = {}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        out[path.stem] = {node.name for node in tree.body
                          if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel")
                          and any("jit" in ast.unparse(d) for d in node.decorator_list)}
    return out


def _by_kernel(specs, name):
    return [s for s in specs if s.name == name]


def test_specializations_cover_every_kernel_and_mode(specs):
    from fastmam.kernels import launch

    kernels = {f"fastmam.kernels.{module}:{name}" for module, names in _jit_kernels().items() for name in names}
    assert {s.kernel for s in specs} == kernels  # a new kernel needs launches here
    assert len(set(specs)) == len(specs)  # deduplicated

    gather = _by_kernel(specs, "_gather_normalize_fwd_kernel")
    dtypes = {(dict(s.signature)["clip_ptr"], dict(s.signature)["out_ptr"]) for s in gather}
    floats = {"*fp32", "*bf16", "*fp16"}
    assert dtypes == {(c, o) for c in floats | {"*u8"} for o in floats}
    assert {s.constexpr_values["PATCH"] for s in gather} == {8, 16}
    # Triton's JIT rule, applied to the real strides: a unit stride is a constexpr 1 (channels of a BTHWC clip,
    # columns of a BCTHW one), other ints are i32 here
    for s in gather:
        unit = "s_c" if dict(s.signature)["clip_ptr"] == "*u8" else "s_w"
        assert s.constexpr_values[unit] == 1 and dict(s.signature)["K"] == "i32", s.summary()

    targets = _by_kernel(specs, "_masked_target_fwd_kernel")
    modes = {(dict(s.signature)["clip_ptr"], s.constexpr_values["PATCH"], s.constexpr_values["DIFF"],
              s.constexpr_values["NORMALIZE"]) for s in targets}
    expected = {("*u8", p, d, n) for p in (8, 16) for d in (0, 1, 2) for n in (False, True)}
    expected |= {(c, 16, d, n) for c in floats for d in (0, 1, 2) for n in (False, True)}  # VideoMAE's clips
    assert modes == expected

    (ce,) = _by_kernel(specs, "_ce_fwd_grad_kernel")  # K and its stride are multiples of 16 at every codebook size
    assert ce.constexpr_values == {"BLOCK_K": launch.CE_BLOCK_K}
    assert {int(src.rsplit(" ", 1)[1]) for src in ce.sources} == {1024, 8192, 16384}

    copies = _by_kernel(specs, "_copy_rows_kernel")  # widths 64 .. 1024: blocks of 64 .. 1024
    blocks = (64, 128, 256, 512, 1024)
    assert {(dict(s.signature)["src_ptr"], s.constexpr_values["SCATTER"], s.constexpr_values["BLOCK_D"])
            for s in copies} == {(d, sc, bd) for d in floats for sc in (False, True) for bd in blocks}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_specialization_compiles_without_spills(specs, results, arch):
    from fastmam.kernels import aot

    product = set(specs)
    mine = [r for r in results if r.arch == arch and r.spec in product]
    failed = [r for r in mine if not r.ok]
    print(aot.format_table(mine))
    assert len(mine) == len(specs) and not failed, \
        aot.format_table(failed) + "\n" + "\n".join(p for r in failed for p in r.problems)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_spill_or_a_compile_error_fails_the_check(specs, results, arch):
    from fastmam.kernels import aot

    spill, error = (next(r for r in results if r.arch == arch and r.spec == _copy_rows_variant(specs, block, warps))
                    for block, warps in ((8192, 1), (1000, 4)))
    assert spill.resources.spill_stores > 0 and spill.resources.stack > 0 and not spill.ok
    assert any("spill" in p for p in spill.problems), spill.problems
    assert error.resources is None and not error.ok and "power of 2" in error.error, error.error
    assert "FAIL" in aot.format_table([spill, error])


def test_cli_prints_the_table_writes_json_and_fails_on_a_spill(specs, results, tmp_path, capsys, monkeypatch):
    from fastmam.kernels import aot

    chosen = [next(s for s in specs if s.name == "_ce_fwd_grad_kernel"), _copy_rows_variant(specs, 8192, 1)]
    asked = []
    monkeypatch.setattr(aot, "specializations", lambda *args: asked.append(args) or chosen)
    path = tmp_path / "aot.json"
    assert aot.main(["--arch", "90", "--presets", "tiny", "--codebooks", "8192", "--json", str(path)]) == 1
    assert asked == [(["tiny"], [8192])]
    captured = capsys.readouterr()
    assert re.search(r"^_ce_fwd_grad_kernel +sm_90 +\d+ +0/0 +0 .* ok ", captured.out, re.MULTILINE), captured.out
    assert "1 ok, 1 failed" in captured.out and "FAILED _copy_rows_kernel on sm_90" in captured.err
    rows = json.loads(path.read_text())
    assert [(r["kernel"].rsplit(":", 1)[1], r["arch"], r["ok"]) for r in rows] == [
        ("_ce_fwd_grad_kernel", 90, True), ("_copy_rows_kernel", 90, False)]
    assert rows[1]["resources"]["spill_stores"] > 0 and rows[1]["constexprs"]["BLOCK_D"] == 8192


def test_check_arch_compiles_one_specialization_per_kernel(specs, results):
    from fastmam.kernels import aot

    checked = aot.check_arch(90)
    assert sorted(r.spec.name for r in checked) == sorted(n for names in _jit_kernels().values() for n in names)
    assert all(r.ok and r.arch == 90 for r in checked), aot.format_table(checked)
    with pytest.raises(aot.AOTCompileError, match="power of 2"):
        aot.compile_spec(_copy_rows_variant(specs, 1000, 4), 80)


def test_every_kernel_is_launched_through_launch():
    """``kernel[grid](...)`` in a launcher would bypass kernels/launch.py, which the check reads."""
    for module, names in _jit_kernels().items():
        tree = ast.parse((KERNELS_DIR / f"{module}.py").read_text())
        launched = {ast.unparse(node.args[0]) for node in ast.walk(tree)
                    if isinstance(node, ast.Call) and ast.unparse(node.func) == "launch" and node.args}
        direct = [ast.unparse(node) for node in ast.walk(tree)
                  if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                  and ast.unparse(node.func.value) in names]
        assert launched == names and not direct, (module, launched, direct)


def test_launcher_and_check_read_the_same_launch_params(monkeypatch, rng):
    """Change the token copy's parameters: the launch that runs (here in the interpreter) and the check's
    specializations both follow."""
    from fastmam.kernels import aot, launch, tokens

    from fastmam import ops

    def changed(dim, scatter):
        params = launch.copy_rows_params(dim, scatter)
        return params._replace(constexprs=params.constexprs | {"BLOCK_D": 16}, num_warps=2)

    seen = []

    def spy(kernel, grid, args, params):
        seen.append(params)
        real_launch(kernel, grid, args, params)

    real_launch = tokens.launch
    monkeypatch.setattr(tokens, "copy_rows_params", changed)
    monkeypatch.setattr(tokens, "launch", spy)
    x = torch.randn(2, 9, 40, generator=rng)
    ids = torch.stack([torch.randperm(9, generator=rng)[:4] for _ in range(2)])
    assert torch.equal(ops.gather_tokens(x, ids, backend="triton"), ops.gather_tokens(x, ids, backend="reference"))
    assert seen == [launch.LaunchParams({"SCATTER": False, "BLOCK_D": 16}, num_warps=2)]

    copies = _by_kernel(aot.specializations(("tiny",), codebook_sizes=()), "_copy_rows_kernel")
    assert copies and all(s.constexpr_values["BLOCK_D"] == 16 and s.num_warps == 2 for s in copies)
