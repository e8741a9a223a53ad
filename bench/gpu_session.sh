#!/usr/bin/env bash
# One call on a lent GPU machine (see ../shared/GPU.md): install carried wheels, build the CUDA
# extension (csrc/ -> fastmam._C, sm_90), run every test on the GPU (Triton and CUDA kernels for real,
# `gpu`-marked checks and compute-sanitizer included), then the op benchmark at ViT-B shapes in bf16 and the
# training-step benchmark against Hugging Face's VideoMAEForPreTraining.
# Everything lands in $OUT (logs, JSON rows, PNG).
#   carry: .whl (pydantic, deepspeed sdist, einops/safetensors/tqdm if missing), e.g. from the repo root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic pydantic-core annotated-types typing-inspection hjson
#   python3 -m pip download --no-deps -d .whl deepspeed==0.19.8
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/* > "$OUT/pip.log" 2>&1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# kernels/ installs as fastmam.kernels (setup.py's package_dir); run from the source tree, a link gives it that name
[ -e fastmam/kernels ] || ln -s ../kernels fastmam/kernels
# first: what this machine has and which backend each op will take (again after the build, with the extension)
python3 -m fastmam.doctor --json "$OUT/doctor.json" > "$OUT/doctor.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" > "$OUT/versions.txt" 2>&1
# the extension, in place (fastmam/_C*.so), for the H100/H200 only: one architecture builds in about a minute
export FASTMAM_CUDA_ARCH=90  # exported: the tests that read the built archs expect this one
MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$?" >> "$OUT/build.log"
python3 -m fastmam.doctor --json "$OUT/doctor_built.json" > "$OUT/doctor_built.txt" 2>&1
# no -x: on a one-shot GPU session one failure must not hide the others
python3 -m pytest -q -rfEs tests/ops tests/models > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest_gpu.log"
python3 bench/throughput.py --compile --no-step --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
# training steps of ViT-S/B/L and the VideoMAE config, each beside HF VideoMAEForPreTraining (transformers is on
# the machine): ms/step, clips/s, MFU, peak memory, ratio to the peer; a run of its own so that it survives the other
python3 bench/throughput.py --no-ops --out "$OUT" > "$OUT/bench_step.log" 2>&1
echo "bench step rc=$?" >> "$OUT/bench_step.log"
# fine-tuning steps of the ft_vit_b_* shapes in bf16 (300 steps each, in-memory clips): ms/step, clips/s, peak memory
python3 bench/finetune_step.py --steps 300 --out "$OUT" > "$OUT/bench_finetune.log" 2>&1
echo "bench finetune rc=$?" >> "$OUT/bench_finetune.log"
# the largest preset that trains on this card with ZeRO-3 + activation checkpointing (needs deepspeed from .whl)
python3 bench/fit.py --presets vit_b vit_l vit_h vit_g --timeout 300 --out "$OUT" > "$OUT/fit.log" 2>&1
echo "fit rc=$?" >> "$OUT/fit.log"
tail -n 5 "$OUT/build.log" "$OUT/pytest_gpu.log" "$OUT/bench.log" "$OUT/bench_step.log" "$OUT/bench_finetune.log" \
    "$OUT/fit.log"
