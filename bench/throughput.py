"""Benchmarks of fastmam's ops and training step.

    python bench/throughput.py                 # ViT-B shapes (B=64, 16x224, tubelet 2, patch 16, ratio 0.9)
    python bench/throughput.py --quick         # tiny CPU shapes: keeps the harness working in CI
    python bench/throughput.py --compile       # add torch.compile(reference) rows
    python bench/throughput.py --out results/  # also write JSON rows there

Every row carries the device, versions, git commit and shape. Memory-bound ops report GB/s from
the bytes they must move at minimum (formula per op below). Numbers are only ever the ones
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
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from bench.harness import environment, format_table, time_fn  # noqa: E402
from fastmam import ops  # noqa: E402
from fastmam.config import load_config  # noqa: E402
from fastmam.models import Pretrainer  # noqa: E402
from fastmam.ops import _backend  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def shapes(quick: bool) -> dict:
    if quick:
        return {"B": 2, "T": 4, "H": 32, "t": 2, "p": 8, "ratio": 0.75, "K": 64, "Da": 32, "preset": "tiny"}
    return {"B": 64, "T": 16, "H": 224, "t": 2, "p": 16, "ratio": 0.9, "K": 8192, "Da": 384, "preset": "vit_b"}


def op_cases(s: dict, device: torch.device, dtype: torch.dtype):
    """(op name, shape string, callables taking ``impl`` function, minimal bytes moved) per op."""
    b, t_frames, h, t, p, ratio = s["B"], s["T"], s["H"], s["t"], s["p"], s["ratio"]
    g = torch.Generator(device=device).manual_seed(0)
    clip = torch.randint(0, 256, (b, t_frames, h, h, 3), dtype=torch.uint8, device=device, generator=g)
    spatial = (h // p) ** 2
    noise = torch.rand(b, spatial, device=device, generator=g)
    m = ops.tube_masking(noise, ratio, t_frames // t)
    nv, nm = m.ids_keep.shape[1], m.ids_masked.shape[1]
    pv = t * p * p * 3
    shape = f"B{b} T{t_frames} {h}x{h} t{t} p{p} r{ratio}"

    # bytes: read the visible uint8 pixels once, write them in the model dtype (+ ids and mask)
    gather_bytes = b * nv * pv * (1 + dtype.itemsize) + b * (nv + nm) * 8 + b * (nv + nm)
    yield ("tube_mask_gather", shape,
           lambda f: f(clip, noise, ratio, t, p, MEAN, STD, dtype), gather_bytes, ops.tube_mask_gather_reference)
    # targets: read the masked uint8 pixels, write fp32 targets
    yield ("pixel_target", shape, lambda f: f(clip, m.ids_masked, t, p, True),
           b * nm * pv * (1 + 4), ops.pixel_target_reference)
    yield ("rgb_diff_target", shape, lambda f: f(clip, m.ids_masked, t, p, False),
           b * nm * pv + b * nm * (t - 1) * p * p * 3 * 4, ops.rgb_diff_target_reference)

    k, da, dm = s["K"], s["Da"], (t - 1) * p * p * 3
    h_a = torch.randn(b * nm, da, device=device, dtype=dtype, generator=g, requires_grad=True)
    w = (torch.randn(k, da, device=device, generator=g) / da**0.5).to(dtype).requires_grad_()
    bias = torch.zeros(k, device=device, dtype=dtype, requires_grad=True)
    codes = torch.randint(0, k, (b * nm,), device=device, generator=g)
    mp = torch.randn(b * nm, dm, device=device, dtype=dtype, generator=g, requires_grad=True)
    mt = torch.randn(b * nm, dm, device=device, generator=g)

    def loss_fwd_bwd(f):
        out = f(h_a, w, bias, codes, mp, mt)
        out.total.backward()
        return out

    # the loss is compute-bound at codebook scale; bytes = inputs read once and grads written once
    loss_bytes = 2 * dtype.itemsize * (h_a.numel() + w.numel() + mp.numel()) + 4 * mt.numel()
    yield ("dual_decoder_loss", f"M{b * nm} Da{da} K{k} Dm{dm}", loss_fwd_bwd, loss_bytes,
           ops.dual_decoder_loss_reference)


def step_row(preset: str, batch: int, device: torch.device, dtype: torch.dtype, env: dict) -> dict:
    """One optimizer step of the full objective (forward, backward, AdamW) on in-memory uint8 clips."""
    cfg = load_config(preset, [f"data.batch_size={batch}"])
    model = Pretrainer(cfg).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    d = cfg.data
    clip = torch.randint(0, 256, (batch, d.num_frames, d.img_size, d.img_size, 3), dtype=torch.uint8, device=device)
    noise = torch.rand(model.noise_shape(batch), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(clip, noise).total.backward()
        opt.step()

    timing = time_fn(step, device, warmup=2, reps=5)
    return {"op": "train_step", "impl": "reference", "pass": "fwd+bwd+opt", "shape": f"{preset} B{batch}",
            **timing, "clips_per_s": batch / (timing["ms_median"] / 1e3), **env}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU (CI)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step row")
    ap.add_argument("--out", type=Path, default=None, help="folder for the JSON rows")
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = shapes(args.quick)
    env = environment(device)
    rows = []
    for name, shape, call, nbytes, reference in op_cases(s, device, dtype):
        impls = [("reference", reference)]
        if args.compile:
            impls.append(("compile(reference)", torch.compile(reference)))
        # fused kernels: timed only on a GPU (the Triton interpreter on CPU measures nothing useful)
        for backend in ("triton", "cuda"):
            if device.type == "cuda" and backend in ops.available(name):
                impls.append((backend, _backend.resolve(name, backend, device)[1]))
        for impl, fn in impls:
            timing = time_fn(lambda fn=fn, call=call: call(fn), device)
            rows.append({"op": name, "impl": impl, "pass": "fwd+bwd" if name == "dual_decoder_loss" else "fwd",
                         "shape": shape, **timing, "gb_per_s": nbytes / (timing["ms_median"] / 1e3) / 1e9,
                         "bytes": nbytes, "dtype": str(dtype).removeprefix("torch."), **env})
    if not args.no_step:
        rows.append(step_row(s["preset"], s["B"], device, dtype, env))

    print(f"device: {env['device']} ({env['device_type']}), torch {env['torch']}, commit {env['commit']}")
    print(format_table(rows))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"throughput_{env['device_type']}_{time.strftime('%Y%m%d_%H%M%S')}.json"
        path.write_text(json.dumps(rows, indent=1))
        print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
