import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_kernels_folder_is_fastmam_kernels():
    import fastmam.kernels

    assert Path(fastmam.kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


def test_no_module_shadows_a_top_level_package():
    """`deepspeed fastmam/pretrain.py` runs with fastmam/ on sys.path (pretrain.py removes it, but never rely on
    that alone): no module in fastmam/ may share a name with a package we or our dependencies import."""
    taken = {"deepspeed", "torch", "triton", "numpy", "yaml", "pydantic", "tqdm", "safetensors", "einops", "logging",
             "json", "math", "time", "random", "types", "typing", "copy", "io", "os", "sys", "kernels", "tensorboard"}
    names = {p.stem for p in (REPO / "fastmam").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert not names & taken, names & taken


@pytest.mark.slow
def test_wheel_contains_kernels_and_skips_cuda(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next(tmp_path.glob("fastmam-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fastmam/kernels/__init__.py" in names and "kernels/__init__.py" not in names
    assert {"fastmam/ops/__init__.py", "fastmam/models/mam.py", "fastmam/data/synthetic.py"} <= names
    # the target dir is a regular (non-editable) install: fastmam.kernels must import from it
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert {"fastmam/presets/tiny.yaml", "fastmam/presets/vit_b.yaml"} <= names
    probe = subprocess.run([sys.executable, "-c", "import fastmam.kernels as k; print(k.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert probe.returncode == 0 and str(target) in probe.stdout, probe.stderr
    # presets by name from a regular install (no source tree around)
    site = ":".join(p for p in sys.path if "site-packages" in p)
    code = "from fastmam.config import load_config, PRESET_DIR; print(PRESET_DIR, load_config('tiny').name)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                           env={"PYTHONPATH": f"{target}:{site}"})
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(target / "fastmam" / "presets"), "tiny"]
