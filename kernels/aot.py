"""Ahead-of-time compile check of the Triton kernels, without a GPU.

The Triton interpreter that runs the CPU tests accepts programs that the compiler rejects (a non-power-of-2
``tl.arange``, mixed dtypes, more shared memory than a GPU has), and says nothing about registers or
spills. This module compiles every specialization of our kernels that the product launches to cubin for
real architectures (sm_80 and sm_90 by default) and reports registers, spills and shared memory of each;
a spill, a compile error or too much shared memory fails the check::

    python -m fastmam.kernels.aot                          # sm_80 + sm_90, the presets below
    python -m fastmam.kernels.aot --arch 90 --presets vit_b --json aot.json

How the specializations are found (``specializations``): the real launchers run on meta tensors of each
preset's shapes and dtypes inside ``launch.recording()``, so the runtime arguments, constexprs and
num_warps / num_stages are exactly those of a launch (``kernels/launch.py`` chooses them, for both). Triton's
own specialization function (``native_specialize_impl``, what ``JITFunction.run`` calls on every launch)
turns the arguments into the signature (pointer dtypes, i32 or i64 ints, an int equal to 1 becomes a
constexpr) and the divisibility-by-16 attributes. A meta tensor's address is 0 plus its storage offset, so
the attributes are those of 16-byte-aligned allocations, which PyTorch's allocators give; a user's tensor
at an odd offset gets another (less aligned) specialization that is not checked here.

Resources: registers, stack frame and local memory per thread from ``cuobjdump -res-usage`` on the cubin
(Triton's bundled copy); bytes of spill stores and loads from the ``ptxas -v`` log of Triton's compile (for a
kernel from Triton's cache, of ptxas run again with Triton's flags; cuobjdump has no spill count: spills land
in the stack frame); shared memory per block from the compiled kernel's metadata (Triton's dynamic shared
memory) plus static. Compiled kernels go to Triton's cache (``TRITON_CACHE_DIR``, default
``~/.triton/cache``); a second run only re-reads them.

Under ``TRITON_INTERPRET=1`` (the CPU tests) ``@triton.jit`` gives interpreted functions that cannot be
compiled: the compiles then run in worker processes started without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from .launch import RecordedLaunch, recording

DEFAULT_PRESETS = ("tiny", "vit_s", "vit_b", "vit_l", "videomae_vit_b")
DEFAULT_ARCHS = (80, 90)
#: codebook sizes of the appearance head's cross-entropy (VQGAN f16 codebooks: 1024, 8192 (random_codes'
#: default), 16384 (taming's ImageNet model, targets.vqgan.n_embed's default))
CODEBOOK_SIZES = (1024, 8192, 16384)
#: dtypes of model outputs and tokens: fp32 (CPU, fp32 runs), bf16 (DeepSpeed's GPU default), fp16 (drop-in users)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: presets whose users also pass VideoMAE's own clips: normalized float (B, C, T, H, W), layout 'BCTHW'
VIDEOMAE_LAYOUT_PRESETS = ("videomae_vit_b",)
CHANNELS = 3
#: steps L of MME's trajectories (its scripts' and the extraction's default)
TRAJECTORY_STEPS = 4
#: maximum shared memory per block (opt-in) in bytes, CUDA C++ Programming Guide, "Technical Specifications per
#: Compute Capability": 163 KB on sm_80/87, 99 KB on sm_86/89/120, 227 KB on sm_90/100
MAX_SHARED = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376}


# --------------------------------------------------------------------------- specializations


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compiled variant of a kernel: what Triton's JIT keys its cache on (minus the device).

    signature: (argument, Triton type) in the kernel's order, "constexpr" for constexpr arguments;
    constexprs: (argument index, value), the kernel's constexprs and the ints Triton specializes to 1;
    attrs: (argument index, ((name, value), ...)), e.g. ``(("tt.divisibility", 16),)`` for an aligned pointer
    or a multiple of 16; sources: which preset, op and dtypes launch it (not part of the identity)."""

    kernel: str  # "module:function" of the @triton.jit kernel
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[int, Any], ...]
    attrs: tuple[tuple[int, tuple[tuple[str, int], ...]], ...]
    num_warps: int
    num_stages: int
    sources: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    @property
    def constexpr_values(self) -> dict[str, Any]:
        """Constexpr arguments by name (also the ints that Triton specialized to 1)."""
        return {self.signature[i][0]: v for i, v in self.constexprs}

    def summary(self) -> str:
        """Pointer dtypes, constexprs (also ints specialized to 1), ints divisible by 16, warps and stages."""
        names = [n for n, _ in self.signature]
        divisible = {i for i, attr in self.attrs if ("tt.divisibility", 16) in attr}
        pointers = " ".join(f"{n.removesuffix('_ptr')}={t[1:]}" for n, t in self.signature if t.startswith("*"))
        consts = " ".join(f"{names[i]}={int(v) if isinstance(v, bool) else v}" for i, v in self.constexprs)
        ints = ",".join(n for i, (n, t) in enumerate(self.signature) if t[0] in "iu" and i in divisible)
        return f"{pointers} | {consts} | %16: {ints or '-'} | w{self.num_warps} s{self.num_stages}"

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "signature": dict(self.signature),
                "constexprs": self.constexpr_values,
                "attrs": {self.signature[i][0]: [list(a) for a in attr] for i, attr in self.attrs},
                "num_warps": self.num_warps, "num_stages": self.num_stages, "sources": list(self.sources)}


def _cuda_backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    # the specialization rules (int and pointer divisibility) are the same for every CUDA arch
    return make_backend(GPUTarget("cuda", DEFAULT_ARCHS[0], 32))


def _specialize(call: RecordedLaunch, backend, source: str) -> Spec:
    """The Spec of a recorded launch, by the rules ``JITFunction.run`` applies (``create_function_from_signature``
    and ``_pack_args`` in triton/runtime/jit.py)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.runtime.jit import KernelParam

    kernel = call.kernel
    fn = kernel.fn  # the Python function, for a JITFunction and an InterpretedFunction alike
    options = getattr(kernel, "kwargs", None) or vars(kernel)  # InterpretedFunction keeps the jit kwargs
    dns = options.get("do_not_specialize") or ()
    dns_oa = options.get("do_not_specialize_on_alignment") or ()
    sig = inspect.signature(fn)
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
              for i, p in enumerate(sig.parameters.values())]
    if {p.name for p in params if p.is_constexpr} != set(call.params.constexprs):
        raise TypeError(f"{fn.__name__}: the launch parameters set {sorted(call.params.constexprs)}, the kernel's "
                        f"constexprs are {[p.name for p in params if p.is_constexpr]}")
    bound = sig.bind(*call.args, **call.params.constexprs)  # as the launch binds them
    bound.apply_defaults()
    values = bound.arguments
    signature, constexprs, attrs = [], [], []
    for p in params:
        value = values[p.name]
        if p.is_constexpr:
            ty, key = "constexpr", None
        elif p.annotation_type:
            raise NotImplementedError(f"{fn.__name__}.{p.name}: typed kernel arguments are not modelled here")
        else:
            ty, key = native_specialize_impl(backend, value, p.is_const, not p.do_not_specialize,
                                             not p.do_not_specialize_on_alignment)
        signature.append((p.name, ty))
        if ty == "constexpr":
            constexprs.append((p.num, value))
        elif isinstance(key, str):
            attrs.append((p.num, tuple(tuple(a) for a in backend.parse_attr(key))))
    return Spec(f"{fn.__module__}:{fn.__qualname__}", tuple(signature), tuple(constexprs), tuple(attrs),
                call.params.num_warps, call.params.num_stages, (source,))


def _preset_launches(preset: str, codebook_sizes: Sequence[int]) -> list[tuple[str, RecordedLaunch]]:
    """(description, launch) of every kernel launch of one preset: its launchers run on meta tensors."""
    from fastmam.config import load_config
    from fastmam.flops import token_counts
    from fastmam.ops import _triton
    from fastmam.ops import motion_targets as mt
    from fastmam.ops._checks import clip_geometry
    from fastmam.ops.targets import Diff, target_rows

    from . import cross_entropy, motion, patches, tokens

    cfg = load_config(preset)
    m, d = cfg.model, cfg.data
    b, t, size, c, tub, p = d.batch_size, d.num_frames, d.img_size, CHANNELS, m.tubelet, m.patch
    n, _, masked = token_counts(cfg)
    meta = torch.device("meta")
    ids_keep = torch.empty(b, n - masked, dtype=torch.int64, device=meta)
    ids_masked = torch.empty(b, masked, dtype=torch.int64, device=meta)
    clips = [("BTHWC", torch.empty(b, t, size, size, c, dtype=torch.uint8, device=meta))]
    if preset in VIDEOMAE_LAYOUT_PRESETS:
        clips += [("BCTHW", torch.empty(b, c, t, size, size, dtype=dt, device=meta)) for dt in FLOAT_DTYPES]
    out: list[tuple[str, RecordedLaunch]] = []

    def record(what: str, launcher, *args) -> None:
        with recording() as calls:
            launcher(*args)
        out.extend((f"{preset}: {what}", call) for call in calls)

    def short(dtype: torch.dtype) -> str:
        return str(dtype).removeprefix("torch.")

    for layout, clip in clips:
        # the arguments fastmam.ops._triton's custom ops pass to the launchers
        geometry = clip_geometry(clip, layout, tub, p)
        stats = (list(d.mean), list(d.std)) if layout == "BCTHW" else (None, None)  # target ops: uint8 needs none
        for out_dtype in FLOAT_DTYPES:
            record(f"tube_mask_gather {layout} {short(clip.dtype)} -> {short(out_dtype)}", patches.gather_normalize,
                   clip, ids_keep, tub, p, list(d.mean), list(d.std), out_dtype, layout, geometry)
        for diff in Diff:
            if diff == Diff.PAIRS and tub < 2:
                continue
            next_clip = torch.empty_like(clip) if diff == Diff.DENSE else None
            for normalize in (False, True):
                op = "pixel_target" if diff == Diff.PIXELS else f"rgb_diff_target {diff.name.lower()}"
                record(f"{op} {layout} {short(clip.dtype)} normalize={normalize}", patches.masked_target,
                       clip, next_clip, ids_masked, tub, p, normalize, *stats, layout, geometry, int(diff),
                       target_rows(tub, p, diff))
    # MME's motion targets of the masked tokens, at the preset's geometry (no preset selects them yet: checked for
    # every preset so that their kernels compile wherever the model may run): HOG with the defaults (Sobel, per-token
    # L2) and with central differences unnormalized (scikit-image's); trajectories of TRAJECTORY_STEPS steps as
    # float32 and as the cache's float16, both normalizations
    clip = clips[0][1]
    for sobel, normalize in ((True, True), (False, False)):
        record(f"hog_target sobel={sobel} normalize={normalize}", motion.hog_target, clip, ids_masked, tub, p, 0,
               mt.HOG_CELL, mt.HOG_BINS, sobel, normalize, mt.HOG_EPS, clip_geometry(clip, "BTHWC", tub, p))
    grid = (b, t // tub, size // mt.TRAJECTORY_GRID, size // mt.TRAJECTORY_GRID)
    valid = torch.empty(grid, dtype=torch.bool, device=meta)
    for dtype in (torch.float32, torch.float16):
        disp = torch.empty(*grid, TRAJECTORY_STEPS, 2, dtype=dtype, device=meta)
        for patch_std in (False, True):
            record(f"trajectory_target {short(dtype)} patch_std={patch_std}", motion.trajectory_target, disp, valid,
                   ids_masked, p // mt.TRAJECTORY_GRID, patch_std, mt.TRAJECTORY_BOUND, mt.TRAJECTORY_EPS)
    rows = b * masked  # dual_decoder_loss: the masked tokens' appearance rows (x t with code_frame 'all')
    for k in codebook_sizes:
        h = torch.empty(rows, m.decoder_dim, device=meta)
        weight, bias = torch.empty(k, m.decoder_dim, device=meta), torch.empty(k, device=meta)
        codes, scale = torch.empty(rows, dtype=torch.int64, device=meta), torch.empty(rows, device=meta)
        record(f"dual_decoder_loss codebook {k}", _triton._fused_linear_ce, h, weight, bias, codes, scale,
               _triton.CE_CHUNK_ROWS, _triton.CE_BLOCK_K, cross_entropy.ce_fwd_grad_)
    for dim in sorted({m.embed_dim, m.decoder_dim}):
        for dtype in FLOAT_DTYPES:
            for ids in (ids_keep, ids_masked):
                k = ids.shape[1]
                x = torch.empty(b, n, dim, dtype=dtype, device=meta)
                record(f"gather_tokens ({b}, {n}, {dim}) {short(dtype)} K={k}", tokens.copy_rows, x, ids, k, False)
                x = torch.empty(b, k, dim, dtype=dtype, device=meta)
                record(f"scatter_tokens ({b}, {k}, {dim}) {short(dtype)} N={n}", tokens.copy_rows, x, ids, n, True)
    return out


def specializations(presets: Sequence[str] = DEFAULT_PRESETS,
                    codebook_sizes: Sequence[int] = CODEBOOK_SIZES) -> list[Spec]:
    """The distinct kernel specializations that the presets launch, each with the launches it serves (``sources``).

    Per preset: ``tube_mask_gather`` of its uint8 (B, T, H, W, 3) clips into fp32 / bf16 / fp16 patches (plus
    VideoMAE's float (B, 3, T, H, W) clips for ``VIDEOMAE_LAYOUT_PRESETS``), both target ops in every mode
    (pixels, in-tubelet and dense differences; normalized or not), the fused cross-entropy for each codebook
    size, ``gather_tokens`` / ``scatter_tokens`` of fp32 / bf16 / fp16 tokens of the encoder and decoder
    widths, and MME's ``hog_target`` / ``trajectory_target`` of the masked tokens."""
    backend = _cuda_backend()
    found: dict[Spec, Spec] = {}
    for preset in presets:
        for source, call in _preset_launches(preset, codebook_sizes):
            spec = _specialize(call, backend, source)
            if spec in found:
                known = found[spec]
                if source not in known.sources:
                    found[spec] = dataclasses.replace(known, sources=(*known.sources, source))
            else:
                found[spec] = spec
    kernels = list(dict.fromkeys(spec.kernel for spec in found))  # kernel order of the first preset's launches
    return sorted(found.values(), key=lambda spec: kernels.index(spec.kernel))


# --------------------------------------------------------------------------- compiling


class Resources(NamedTuple):
    """Per thread: registers, bytes of spill stores and loads, stack frame and local memory bytes; per block:
    shared memory bytes (Triton's dynamic shared memory plus static)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    local: int
    shared: int

    @property
    def spills(self) -> int:
        """Bytes of spill traffic per thread (stores + loads), as ``ptxas -v`` reports them."""
        return self.spill_stores + self.spill_loads


class Result(NamedTuple):
    spec: Spec
    arch: int
    resources: Resources | None
    error: str | None = None

    @property
    def problems(self) -> list[str]:
        if self.error is not None:
            return [self.error]
        r, out = self.resources, []
        if r.spills:
            out.append(f"register spills: {r.spill_stores} bytes stored, {r.spill_loads} bytes loaded per thread "
                       f"({r.registers} registers)")
        elif r.stack or r.local:
            # these kernels call no functions and index no local arrays: local memory is a defect too
            out.append(f"local memory: {r.stack} bytes stack frame, {r.local} bytes local per thread")
        limit = MAX_SHARED.get(self.arch)
        if limit is not None and r.shared > limit:
            out.append(f"shared memory {r.shared} bytes > {limit} on sm_{self.arch}")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        res = self.resources._asdict() if self.resources is not None else None
        return {"arch": self.arch, "summary": self.spec.summary(), **self.spec.to_json(), "resources": res,
                "error": self.error, "ok": self.ok}


class AOTCompileError(RuntimeError):
    """A specialization that Triton (or ptxas) could not compile."""


def _jit_function(name: str):
    from triton.runtime.jit import JITFunction

    module, _, attr = name.partition(":")
    fn = getattr(importlib.import_module(module), attr)
    return fn if isinstance(fn, JITFunction) else None


def _res_usage(cubin: bytes, function: str) -> dict[str, int]:
    """``cuobjdump -res-usage`` of one function of a cubin: REG, STACK, SHARED, LOCAL, ..."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(rf"Function {re.escape(function)}:\s*\n\s*(.*)", text)
    if match is None:
        raise AOTCompileError(f"cuobjdump -res-usage does not list {function}:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", match.group(1))}


_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas_log(log: str) -> dict[str, int] | None:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output of one kernel; None if absent."""
    stack, regs = _PTXAS_STACK.search(log), _PTXAS_REGS.search(log)
    if stack is None or regs is None:
        return None
    return {"registers": int(regs.group(1)), "stack": int(stack.group(1)), "spill_stores": int(stack.group(2)),
            "spill_loads": int(stack.group(3))}


def _ptxas_report(ptx: str, arch: int, options) -> dict[str, int]:
    """``ptxas -v`` of Triton's PTX with the flags of Triton's ``make_cubin`` (triton/backends/nvidia/compiler.py;
    -lineinfo does not change the allocation), for a kernel that came from Triton's cache (no ptxas log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
    extra = options.ptx_options.split(" ") if options.ptx_options else []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "kernel.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    report = _parse_ptxas_log(log)
    if report is None:
        raise AOTCompileError(f"unexpected ptxas -v output:\n{log}")
    return report


def _compile_here(spec: Spec, arch: int) -> Resources:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec.kernel)
    if fn is None:
        raise RuntimeError(f"{spec.kernel} is not a triton JITFunction in this process (TRITON_INTERPRET=1?)")
    src = ASTSource(fn, signature=dict(spec.signature), constexprs={(i,): v for i, v in spec.constexprs},
                    attrs={(i,): [list(a) for a in attr] for i, attr in spec.attrs})
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    log = io.StringIO()
    try:
        # Triton runs ptxas -v on every compile and prints its log with this knob (not part of the cache key)
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(src, target=target, options=options)
    except Exception as e:  # CompilationError, ptxas failures (RuntimeError), unsupported arch, ...
        raise AOTCompileError(f"{type(e).__name__}: {e}") from e
    usage = _res_usage(compiled.asm["cubin"], compiled.metadata.name)
    report = _parse_ptxas_log(log.getvalue()) or _ptxas_report(
        compiled.asm["ptx"], arch, triton.compiler.make_backend(target).parse_options(options))
    if (report["registers"], report["stack"]) != (usage["REG"], usage.get("STACK", 0)):
        raise AOTCompileError(f"ptxas -v ({report}) disagrees with the cubin ({usage}): the flags in "
                              "fastmam.kernels.aot._ptxas_report no longer match Triton's make_cubin")
    return Resources(registers=usage["REG"], spill_stores=report["spill_stores"], spill_loads=report["spill_loads"],
                     stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
                     shared=compiled.metadata.shared + usage.get("SHARED", 0))


def _compile_job(spec: Spec, arch: int) -> tuple[Resources | None, str | None]:
    try:
        return _compile_here(spec, arch), None
    except AOTCompileError as e:
        return None, str(e)
    except Exception as e:  # a missing tool, a broken install: reported with the specialization, not a crash
        return None, f"{type(e).__name__}: {e}"


def _worker_init() -> None:
    # compile the real kernels: the module imports below must give JITFunctions, not interpreted functions
    os.environ.pop("TRITON_INTERPRET", None)


def _interpreted() -> bool:
    """Whether this process's kernels are (or would be defined as) interpreted functions."""
    from triton import knobs

    from . import cross_entropy

    return bool(knobs.runtime.interpret) or _jit_function(f"{cross_entropy.__name__}:_ce_fwd_grad_kernel") is None


def _outcome(future: concurrent.futures.Future) -> tuple[Resources | None, str | None]:
    try:
        return future.result()
    except concurrent.futures.BrokenExecutor as e:  # a worker died (a crash inside the compiler)
        return None, f"the compile worker died: {e}"


def compile_all(specs: Iterable[Spec], archs: Iterable[int] = DEFAULT_ARCHS, jobs: int | None = None) -> list[Result]:
    """Compile every spec for every arch; a compile error is a ``Result`` with ``error``, not an exception.

    jobs: worker processes (default: one per CPU). With jobs=1 and compilable kernels in this process, compiles
    here; otherwise in workers started without ``TRITON_INTERPRET``."""
    tasks = [(spec, arch) for arch in archs for spec in specs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1 and not _interpreted():
        outcomes = [_compile_job(spec, arch) for spec, arch in tasks]
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            futures = [pool.submit(_compile_job, spec, arch) for spec, arch in tasks]
            outcomes = [_outcome(f) for f in futures]
    return [Result(spec, arch, res, err) for (spec, arch), (res, err) in zip(tasks, outcomes, strict=True)]


def compile_spec(spec: Spec, arch: int) -> Resources:
    """Compile one specialization to a cubin for sm_<arch> -> its resources; raises ``AOTCompileError``."""
    (result,) = compile_all([spec], [arch], jobs=1)
    if result.error is not None:
        raise AOTCompileError(result.error)
    return result.resources


def check_arch(arch: int, limit: int | None = 1) -> list[Result]:
    """Do the kernels compile for sm_<arch> (e.g. this machine's, ``major * 10 + minor``)? Compiles ``limit``
    specializations per kernel (None: all) of the vit_b preset; ``Result.ok`` / ``.problems`` say how it went.
    A few seconds on a cold cache; for ``python -m fastmam.doctor``."""
    per_kernel: dict[str, list[Spec]] = {}
    for spec in specializations(("vit_b",), codebook_sizes=(8192,)):
        per_kernel.setdefault(spec.kernel, []).append(spec)
    chosen = [s for specs in per_kernel.values() for s in (specs if limit is None else specs[:limit])]
    return compile_all(chosen, [arch], jobs=1)  # in this process unless it interprets the kernels: no start-up


# --------------------------------------------------------------------------- report and CLI


def format_table(results: Sequence[Result]) -> str:
    header = ("kernel", "arch", "regs", "spill st/ld", "stack", "smem", "status", "specialization")
    rows = [header]
    for r in results:
        res = r.resources
        cells = (str(res.registers), f"{res.spill_stores}/{res.spill_loads}", str(res.stack), str(res.shared)) \
            if res is not None else ("-",) * 4
        rows.append((r.spec.name, f"sm_{r.arch}", *cells, "ok" if r.ok else "FAIL", r.spec.summary()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
                     for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmam.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS),
                        help="compute capabilities as major*10+minor (default: 80 90)")
    parser.add_argument("--presets", nargs="+", default=list(DEFAULT_PRESETS), help="config presets (names or paths)")
    parser.add_argument("--codebooks", type=int, nargs="+", default=list(CODEBOOK_SIZES),
                        help="codebook sizes of the cross-entropy")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: one per CPU)")
    parser.add_argument("--json", metavar="PATH", help="also write every result (spec, resources, error) as JSON")
    args = parser.parse_args(argv)
    specs = specializations(args.presets, args.codebooks)
    results = compile_all(specs, args.arch, args.jobs)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_json() for r in results], f, indent=1)
    failed = [r for r in results if not r.ok]
    print(f"\n{len(specs)} specializations x {len(args.arch)} archs: {len(results) - len(failed)} ok, "
          f"{len(failed)} failed")
    for r in failed:
        print(f"\nFAILED {r.spec.name} on sm_{r.arch} [{r.spec.summary()}]\n  launched by: {r.spec.sources[0]}"
              + "".join(f"\n  {line}" for p in r.problems for line in p.splitlines()), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
