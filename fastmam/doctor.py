"""What this machine has for fastmam, and whether a preset can run on it: ``python -m fastmam.doctor``.

The first command on a new machine (the role of DeepSpeed's ``ds_report``). One line per item, by section:

- torch and GPUs: torch, the CUDA it was built with, the driver, each GPU (name, sm_XX, memory, bf16);
- triton: its version, ``fastmam.kernels``, and whether each Triton kernel compiles for the GPU's arch
  (``fastmam.kernels.aot.check_arch``; ``--arch 90`` checks a target arch on a machine without one);
- CUDA extension: whether ``fastmam._C`` is built, loads, and which archs its cubins are for (``cuobjdump``);
- packages: the optional (and required) packages, their versions and the pip line that installs each;
- ops: the backend each public op of ``fastmam.ops`` takes here for a CUDA tensor and for a CPU tensor;
- attention: which attention backends can run here, and what ``model.attention: sdpa`` runs;
- presets (``--preset NAME ...``): whether each can run here, and if not, why (the checks that
  ``fastmam/pretrain.py`` would fail, made without training: see ``check_preset``);

then "to get the rest:", the install commands of what is missing. ``--json PATH`` writes it all as JSON too.
Every probe catches its own errors: a missing or broken package is a line of the report, never a crash. Only the
standard library is imported at the top, so the doctor also runs where torch, pydantic or deepspeed is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import itertools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: what the exit status means (``--help`` lists it; so does the README)
EXIT_STATUSES = {
    0: "every preset named with --preset can run here (or none was named)",
    1: "a named preset cannot run here (the reasons are printed under [presets])",
    2: "an unknown preset name (the known ones are listed), or bad arguments",
}

#: the optional (and required) packages: (name shown, module imported, pip line, what fastmam uses it for).
#: The pip lines are setup.py's extras and install_requires (tests/test_doctor.py checks that they stay so).
PACKAGES = (
    ("DALI", "nvidia.dali", "pip install 'fastmam[dali]'", "data.backend=dali (video decoding on the GPU)"),
    ("decord", "decord", "pip install 'fastmam[decord]'", "data.backend=decord (CPU video decoding)"),
    ("PyAV", "av", "pip install 'av>=12'", "data.backend=pyav, the default decoder; every video's probe"),
    ("flash-attn", "flash_attn", "pip install 'fastmam[flash-attn]'", "model.attention=flash_attn (CUDA)"),
    ("xformers", "xformers", "pip install 'fastmam[xformers]'", "model.attention=xformers (CUDA)"),
    ("tensorboard", "tensorboard", "pip install 'fastmam[tensorboard]'", "logging.tensorboard (curves)"),
    ("taming", "taming", "pip install --no-deps taming-transformers==0.0.1",
     "the tests only, to compare our VQGAN with taming's (training reads taming checkpoints without it)"),
    ("deepspeed", "deepspeed", "pip install 'deepspeed>=0.15'",
     "fastmam/pretrain.py (every run is a DeepSpeed engine)"),
    ("transformers", "transformers", "pip install 'transformers>=4.46'",
     "the export's VideoMAEModel check and the step benchmark's peer"),
    ("torchvision", "torchvision", "pip install torchvision", "nothing in fastmam (taming's own modules import it)"),
    ("pydantic", "pydantic", "pip install 'pydantic>=2.5'", "fastmam.config (the typed config of every run)"),
    ("PyYAML", "yaml", "pip install 'pyyaml>=6.0'", "fastmam.config (presets are YAML)"),
    ("tqdm", "tqdm", "pip install 'tqdm>=4.60'", "logging.progress_bar"),
    ("safetensors", "safetensors", "pip install 'safetensors>=0.4'", "python -m fastmam.export"),
)
#: found and versioned from their installed metadata, not imported: pure Python (torchvision: used by nothing of
#: ours), and seconds to import each, on top of the binary packages whose import is the real test
NOT_IMPORTED = frozenset({"transformers", "tensorboard", "taming", "torchvision"})
#: distribution names where they differ from the module's
DISTRIBUTIONS = {"taming": "taming-transformers", "yaml": "PyYAML", "av": "av"}
#: the public ops of ``fastmam.ops`` whose backend the report shows
OPS = ("tube_mask_gather", "pixel_target", "rgb_diff_target", "dual_decoder_loss", "gather_tokens", "scatter_tokens",
       "tube_masking", "random_masking", "decoder_masking", "hog_target", "trajectory_target")
#: what every configuration of fastmam/pretrain.py calls (Pretrainer.forward): the masking gather and the loss;
#: the two target ops only when their target is configured
STEP_OPS = ("tube_mask_gather", "dual_decoder_loss")
SECTIONS = ("torch and GPUs", "triton", "CUDA extension", "packages", "ops", "attention", "presets")
#: the attention shape the SDPA kernel probe uses: ViT-B's heads and head dim, 16x224 visible tokens at 90% masking
SDPA_PROBE_SHAPE = (2, 12, 160, 64)

_MARK = {"ok": "ok", "missing": "no", "fail": "FAIL", "skip": "skip", "info": "", "warn": "warn", "error": "ERROR"}


class UnknownPreset(ValueError):
    """``--preset`` named neither a preset nor a YAML file; the message lists the presets (exit status 2)."""


@dataclass
class Line:
    """One item of the report. status: ok | missing | fail | skip | info | warn | error."""

    section: str
    name: str
    status: str
    detail: str = ""
    install: str = ""  # the command that fixes a missing item


@dataclass
class PresetCheck:
    """Whether a preset can run here: ``reasons`` it cannot (empty: it can), ``notes`` worth knowing."""

    name: str
    runs: bool = False
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    install: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # device, precision, attention, op backends, memory


@dataclass
class Report:
    lines: list[Line] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # the structured values that --json adds to the lines

    def add(self, section: str, name: str, status: str, detail: str = "", install: str = "") -> None:
        self.lines.append(Line(section, name, status, detail, install))


# --------------------------------------------------------------------------- small helpers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


_IMPORTS: dict[str, tuple[object | None, str]] = {}


def try_import(module: str) -> tuple[object | None, str]:
    """(module, '') or (None, why it does not import); memoized. Anything an import raises is caught (a package
    built against another torch raises OSError or RuntimeError, not only ImportError), and what it prints is
    swallowed, so that the report stays readable."""
    if module not in _IMPORTS:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError as exc:  # importing a parent package failed: missing, or broken
            missing = isinstance(exc, ModuleNotFoundError) and exc.name and f"{module}.".startswith(f"{exc.name}.")
            _IMPORTS[module] = (None, "not installed" if missing else f"does not import ({_first_line(exc)})")
            return _IMPORTS[module]
        except ValueError:
            found = False
        if not found:
            _IMPORTS[module] = (None, "not installed")
        else:
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                        warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _IMPORTS[module] = (importlib.import_module(module), "")
            except Exception as exc:  # (any failure of an optional package is a line of the report)
                _IMPORTS[module] = (None, f"installed but does not import ({_first_line(exc)})")
    return _IMPORTS[module]


def _version(module: object, name: str) -> str:
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else _installed_version(name) or "version unknown"


def _installed_version(name: str) -> str | None:
    """The version of the installed distribution that provides module ``name``, without importing it."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in (DISTRIBUTIONS.get(name, name), name.replace("_", "-"), name.split(".")[0]):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "version unknown"


def _run(cmd: list[str], timeout: float = 60) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def parse_arch(text: str) -> int:
    """'90', 'sm_90', 'sm90', '9.0' -> 90."""
    t = text.strip().lower().removeprefix("sm_").removeprefix("sm").removeprefix("compute_")
    m = re.fullmatch(r"(\d+)\.(\d)|(\d{2,3})", t)
    if not m:
        raise argparse.ArgumentTypeError(f"--arch {text!r} is not a CUDA arch; expected e.g. 90, sm_90 or 9.0")
    return int(m.group(1)) * 10 + int(m.group(2)) if m.group(1) else int(m.group(3))


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _torch():
    return try_import("torch")[0]


def _gpus() -> list[dict]:
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "arch": p.major * 10 + p.minor, "capability": f"{p.major}.{p.minor}",
                    "memory_bytes": p.total_memory, "sms": p.multi_processor_count,
                    # bf16 arithmetic in hardware: Ampere (sm_80) and later
                    "bf16": p.major >= 8})
    return out


# --------------------------------------------------------------------------- probes


def probe_torch(rep: Report, args) -> None:
    s = "torch and GPUs"
    rep.add(s, "python", "info", f"{platform.python_version()} ({sys.executable}), {platform.system()} "
                                 f"{platform.machine()}")
    torch, why = try_import("torch")
    if torch is None:
        rep.add(s, "torch", "missing", why, "pip install torch (>= 2.5; see https://pytorch.org for your CUDA)")
        return
    rep.add(s, "torch", "ok", f"{torch.__version__} ({Path(torch.__file__).parent})")
    cuda = torch.version.cuda
    rep.add(s, "CUDA (torch build)", "info" if cuda else "warn",
            cuda if cuda else "none: a CPU build of torch (no GPU kernels, no fastmam._C)")
    rep.data["torch"] = {"version": torch.__version__, "cuda": cuda, "cuda_available": torch.cuda.is_available()}
    driver = _driver_version(torch)
    rep.add(s, "driver", "info" if driver else "skip", driver or "no NVIDIA driver found (pynvml, nvidia-smi)")
    rep.data["torch"]["driver"] = driver
    gpus = _gpus()
    rep.data["gpus"] = gpus
    if not gpus:
        why = "torch is a CPU build" if not cuda else "torch.cuda.is_available() is False"
        rep.add(s, "GPUs", "skip", f"none visible ({why})")
        return
    for g in gpus:
        bf16 = "yes" if g["bf16"] else "no (needs sm_80+)"
        rep.add(s, f"GPU {g['index']}", "ok",
                f"{g['name']}, sm_{g['arch']}, {_gib(g['memory_bytes'])}, {g['sms']} SMs, bf16 {bf16}")


def _driver_version(torch) -> str | None:
    """The NVIDIA driver: pynvml when installed, else nvidia-smi, else the CUDA driver API version torch sees."""
    pynvml, _ = try_import("pynvml")
    if pynvml is not None:
        try:
            pynvml.nvmlInit()
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else str(v)
        except Exception:  # (no driver: fall through to the next way)
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        out = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], timeout=30)
        if out and out.strip():
            return out.strip().splitlines()[0]
    if torch.cuda.is_available():
        try:
            v = torch._C._cuda_getDriverVersion()  # e.g. 13000: the CUDA version the driver supports
            return f"supports CUDA {v // 1000}.{v % 1000 // 10} (no nvidia-smi for the driver's own version)"
        except Exception:
            return None
    return None


def probe_triton(rep: Report, args) -> None:
    s = "triton"
    triton, why = try_import("triton")
    if triton is None:
        rep.add(s, "triton", "missing", f"{why}: the fused kernels are off, the ops use their references",
                "pip install 'triton>=3.0'")
        rep.data["triton"] = {"version": None}
        return
    rep.add(s, "triton", "ok", _version(triton, "triton"))
    rep.data["triton"] = {"version": _version(triton, "triton")}
    kernels, why = try_import("fastmam.kernels")
    if kernels is None:
        rep.add(s, "fastmam.kernels", "fail", f"{why}: the 'triton' backend fails at its first call. kernels/ becomes "
                "fastmam.kernels when fastmam is installed (pip install -e .)", "pip install -e .")
    else:
        rep.add(s, "fastmam.kernels", "ok", str(Path(kernels.__file__).parent))
    archs = [args.arch] if args.arch is not None else sorted({g["arch"] for g in rep.data.get("gpus", [])})
    rep.data["triton"]["kernels"] = {}
    if not archs:
        rep.add(s, "kernels", "skip", "no GPU here to compile for; --arch 90 checks a target arch (sm_90) anyway")
        return
    for arch in archs:
        rep.data["triton"]["kernels"][f"sm_{arch}"] = _check_arch(rep, arch)


def _field(obj, *names, default=None):
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return default


def _check_arch(rep: Report, arch: int) -> dict:
    """One line per Triton kernel from ``fastmam.kernels.aot.check_arch(arch)`` (one specialization each, of the
    vit_b preset's launches), or one 'not checked' line."""
    s, name = "triton", f"kernels sm_{arch}"
    aot, why = try_import("fastmam.kernels.aot")
    check = getattr(aot, "check_arch", None) if aot is not None else None
    if check is None:
        reason = (f"fastmam.kernels.aot (kernels/aot.py) is {why.replace('not installed', 'not in this install')}"
                  if aot is None else "fastmam.kernels.aot has no check_arch")
        rep.add(s, name, "skip", f"not checked: {reason}")
        return {"checked": False, "reason": reason}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = list(check(arch))
    except Exception as exc:
        reason = f"check_arch({arch}) failed: {_first_line(exc)}"
        rep.add(s, name, "error", f"not checked: {reason}")
        return {"checked": False, "reason": reason}
    rows = []
    for r in results:  # aot.Result: spec (its kernel's name), resources, error, ok, problems
        spec = _field(r, "spec")
        kernel = str(_field(spec, "name", default=None) or _field(r, "kernel", "name", default=r))
        error = _field(r, "error")
        problems = list(_field(r, "problems", default=None) or ([error] if error else []))
        ok = bool(_field(r, "ok", default=not problems))
        resources = _field(r, "resources")
        if hasattr(resources, "_asdict"):
            resources = resources._asdict()
        if isinstance(resources, dict):
            res = ", ".join(f"{k} {v}" for k, v in resources.items())
        else:
            res = str(resources or "")
        sources = _field(spec, "sources", default=()) or ()
        detail = (res if ok else "; ".join(map(str, problems))) + (f" ({sources[0]})" if sources else "")
        rep.add(s, f"sm_{arch} {kernel}", "ok" if ok else "fail", detail)
        to_json = getattr(r, "to_json", None)
        rows.append({"kernel": kernel, "ok": ok, "problems": problems, "resources": resources,
                     **(to_json() if callable(to_json) else {})})
    if not rows:
        rep.add(s, name, "warn", "check_arch returned no kernels")
    return {"checked": True, "results": rows}


def find_cuobjdump() -> str | None:
    """cuobjdump: on PATH, in a CUDA toolkit, or the copy that Triton's wheel ships (triton/backends/nvidia/bin)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    folders = [Path(h) / "bin" for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    folders += [Path("/usr/local/cuda/bin"), *(p / "bin" for p in sorted(Path("/usr/local").glob("cuda-*"))[::-1])]
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        folders.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin")
    return next((str(f / "cuobjdump") for f in folders if (f / "cuobjdump").is_file()), None)


def extension_archs(path: str) -> tuple[list[int], list[int]] | None:
    """(cubin archs, PTX archs) embedded in a CUDA library, read with ``cuobjdump``; None without cuobjdump."""
    tool = find_cuobjdump()
    if tool is None:
        return None
    elf = _run([tool, "--list-elf", path]) or ""
    ptx = _run([tool, "--list-ptx", path]) or ""
    return (sorted({int(a) for a in re.findall(r"sm_(\d+)", elf)}),
            sorted({int(a) for a in re.findall(r"(?:sm|compute)_(\d+)", ptx)}))


def probe_extension(rep: Report, args) -> None:
    s = "CUDA extension"
    torch = _torch()
    info: dict = {"built": False, "loaded": False}
    rep.data["cuda_extension"] = info
    try:
        spec = importlib.util.find_spec("fastmam._C")
    except ImportError:
        spec = None
    library = os.environ.get("FASTMAM_CUDA_LIBRARY")
    path = spec.origin if spec is not None else library
    if path is None:
        if torch is None or torch.version.cuda is None:
            why = "torch is a CPU build" if torch is not None else "torch is not installed"
        elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            why = "nvcc was not found when fastmam was installed?"
        else:
            why = "not built in this install"
        rep.add(s, "fastmam._C", "missing", f"{why}: backend='cuda' is off (Triton and the references are not "
                "affected)", "pip install -e . --no-build-isolation  # with nvcc and a CUDA build of torch")
        return
    info.update(built=True, path=path)
    # importing fastmam.ops loads it (fastmam/ops/_cuda.py load_extension) and warns once when it does not load
    ops, why = try_import("fastmam.ops")
    cuda_mod = sys.modules.get("fastmam.ops._cuda")
    loaded = bool(getattr(cuda_mod, "LOADED", False))
    info["loaded"] = loaded
    if loaded:
        names = [op for op in ("tube_mask_gather", "pixel_target", "rgb_diff_target")
                 if torch is not None and hasattr(torch.ops.fastmam_cuda, op)]
        rep.add(s, "fastmam._C", "ok", f"loads ({path}); torch.ops.fastmam_cuda: {', '.join(names) or 'no ops?'}")
    else:
        try:
            importlib.import_module("fastmam._C")
            error = "fastmam.ops did not load it" if ops is not None else f"fastmam.ops {why}"
        except Exception as exc:
            error = _first_line(exc)
        info["error"] = error
        if torch is not None and torch.version.cuda is None:
            # a CUDA build's library next to a CPU torch (an editable checkout shared by two environments)
            rep.add(s, "fastmam._C", "skip", f"built ({path}) against a CUDA torch; this torch is a CPU build, so it "
                    f"cannot load ({error}); backend='cuda' is off")
        else:
            rep.add(s, "fastmam._C", "fail", f"built ({path}) but does not load: {error}; rebuild it against this "
                    "torch", "pip install -e . --no-build-isolation")
    archs = extension_archs(path)
    if archs is None:
        rep.add(s, "archs", "skip", "unknown: cuobjdump not found (it comes with the CUDA toolkit)")
        return
    cubins, ptx = archs
    info.update(cubins=[f"sm_{a}" for a in cubins], ptx=[f"compute_{a}" for a in ptx])
    rep.add(s, "archs", "info", f"cubins {', '.join(info['cubins']) or 'none'}; PTX {', '.join(info['ptx']) or 'none'}")
    for g in rep.data.get("gpus", []):
        # a cubin runs on its major version at the same or a higher minor; PTX is JIT-compiled for any later arch
        runs = any(a // 10 == g["arch"] // 10 and a <= g["arch"] for a in cubins) or any(a <= g["arch"] for a in ptx)
        rep.add(s, f"for GPU {g['index']} (sm_{g['arch']})", "ok" if runs else "fail",
                "has code for it" if runs else f"no cubin or PTX for sm_{g['arch']}: rebuild with "
                f"FASTMAM_CUDA_ARCH={g['arch']} pip install -e . --no-build-isolation")


def probe_packages(rep: Report, args) -> None:
    s = "packages"
    rep.data["packages"] = {}
    torch = _torch()
    if torch is not None and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as distributed.setup does before DeepSpeed sees a CPU run
    for name, module, install, used in PACKAGES:
        if module in NOT_IMPORTED:
            version = _installed_version(module)
            mod, why = (module, "") if version else (None, "not installed")
        else:
            mod, why = try_import(module)
            version = _version(mod, module) if mod is not None else None
        if module == "nvidia.dali" and mod is None and (getattr(torch, "version", None) and
                                                        (torch.version.cuda or "").startswith("13")):
            install = "pip install nvidia-dali-cuda130  # fastmam[dali] takes -cuda120; this torch is CUDA 13"
        if module == "torchvision" and mod is None and torch is not None:
            # torchvision 0.(m + 15) goes with torch 2.m (0.15 with 2.0, ..., 0.29 with 2.14)
            m = re.match(r"2\.(\d+)", torch.__version__)
            if m:
                install = f"pip install 'torchvision==0.{int(m.group(1)) + 15}.*'  # for torch {torch.__version__}"
        rep.data["packages"][name] = {"module": module, "installed": mod is not None, "version": version,
                                      "error": why or None, "install": install, "used_for": used}
        if mod is not None:
            rep.add(s, name, "ok", f"{version}; used by {used}")
        else:
            rep.add(s, name, "missing", f"{why}; used by {used}", install)


def probe_ops(rep: Report, args) -> None:
    s = "ops"
    torch = _torch()
    if torch is None:
        rep.add(s, "fastmam.ops", "missing", "needs torch")
        return
    problem = _ops_problem()
    if problem is not None:
        rep.add(s, "fastmam.ops", "fail", problem[0], problem[1])
        return
    from fastmam.ops import _backend

    for env in ("FASTMAM_BACKEND", "TRITON_INTERPRET"):
        if os.environ.get(env):
            rep.add(s, env, "info", f"{os.environ[env]} (set in the environment: it changes the choice below)")
    gpu = torch.cuda.is_available()
    kernels_ok = try_import("fastmam.kernels")[0] is not None
    rep.data["ops"] = {}
    for op in OPS:
        row = {"available": list(_backend.available(op))}
        for device in ("cuda", "cpu"):
            try:
                row[device] = _backend.resolve(op, None, torch.device(device))[0]
            except Exception as exc:  # (BackendUnavailableError, a bad FASTMAM_BACKEND)
                row[device] = None
                row[f"{device}_error"] = str(exc)
        rep.data["ops"][op] = row
        cuda_note = "" if gpu else " (no GPU here)"
        status = "ok" if row["cuda"] and row["cpu"] else "fail"
        if row["cuda"] == "triton" and not kernels_ok:
            status, cuda_note = "warn", " (but fastmam.kernels does not import: it would fail)"
        shown = {d: row[d] or _short_error(row[f"{d}_error"]) for d in ("cuda", "cpu")}
        rep.add(s, op, status, f"CUDA tensor: {shown['cuda']}{cuda_note}; CPU tensor: {shown['cpu']}  "
                               f"[built: {', '.join(row['available'])}]")


def _ops_problem() -> tuple[str, str] | None:
    """(why, install) when ``fastmam.ops`` does not import, else None."""
    ops, why = try_import("fastmam.ops")
    if ops is not None:
        return None
    why = why.replace("installed but ", "")
    if "fastmam.kernels" in why:  # a source tree on PYTHONPATH, not installed: kernels/ is not fastmam.kernels
        return (f"fastmam.ops {why}: kernels/ becomes fastmam.kernels only when fastmam is installed",
                "pip install -e .")
    return f"fastmam.ops {why}", ""


def _short_error(message: str) -> str:
    """A resolve() error in a few words (the JSON keeps the whole message)."""
    m = re.search(r"has no '(\w+)' implementation", message) or re.search(r"backend '(\w+)' needs CUDA", message)
    if m:
        return f"fails ('{m.group(1)}' {'is not built for it' if 'implementation' in m.group(0) else 'needs CUDA'})"
    return f"fails ({message.splitlines()[0][:100]})"


def _attention_module():
    """``fastmam.models.attention``. The package ``fastmam.models`` imports the config (hence pydantic) and the ops;
    where one of them does not import (a bare GPU machine) the file, which needs only torch, is loaded on its own."""
    mod, why = try_import("fastmam.models.attention")
    if mod is not None:
        return mod, why
    path = Path(__file__).resolve().parent / "models" / "attention.py"
    spec = importlib.util.spec_from_file_location("_fastmam_doctor_attention", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as exc:
        return None, _first_line(exc)
    return mod, ""


def probe_attention(rep: Report, args) -> None:
    s = "attention"
    if _torch() is None:
        rep.add(s, "attention", "missing", "needs torch")
        return
    torch = _torch()
    att, why = _attention_module()
    if att is None:
        rep.add(s, "attention", "error", f"fastmam.models.attention {why}")
        return
    gpu = torch.cuda.is_available()
    info: dict = {"backends": {}}
    rep.data["attention"] = info
    for name in att.BACKENDS:
        installed = att.is_installed(name)
        where = [d for d in ("cuda", "cpu") if name in att.available_backends(d)]
        info["backends"][name] = {"installed": installed, "runs_on": where}
        if name == "sdpa":
            rep.add(s, name, "ok", "PyTorch scaled_dot_product_attention: CPU and CUDA (model.attention default)")
        elif not installed:
            rep.add(s, name, "missing", f"not installed; CUDA only{'' if gpu else ', and no GPU here'}",
                    att.INSTALL[name].split(" (")[0])
        else:
            try:
                att.attention_function(name, "cuda", torch.bfloat16)
                rep.add(s, name, "ok" if gpu else "skip",
                        "imports; CUDA only" + ("" if gpu else ": no GPU here, so a run here cannot use it"))
            except Exception as exc:  # (AttentionBackendError: installed but broken)
                rep.add(s, name, "fail", _first_line(exc))
    if gpu:
        kernel = _sdpa_kernel(torch, att)
        info["sdpa_cuda_kernel"] = kernel
        rep.add(s, "model here", "info", f"model.attention=sdpa on cuda, bf16 (deepspeed.precision auto): SDPA's "
                                         f"{kernel} kernel at head dim {SDPA_PROBE_SHAPE[-1]}")
    else:
        info["sdpa_cuda_kernel"] = None
        rep.add(s, "model here", "info", "model.attention=sdpa on cpu, fp32: PyTorch's CPU SDPA kernel "
                                         "(flash_attn and xformers need a GPU)")


def _sdpa_kernel(torch, att) -> str:
    """The first kernel of ``SDPA_PRIORITY`` that runs a ViT-B-shaped bf16 attention on this GPU."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(SDPA_PROBE_SHAPE, device="cuda", dtype=torch.bfloat16)
    for backend in att.SDPA_PRIORITY:
        try:
            with sdpa_kernel([backend]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.cuda.synchronize()
            return backend.name.lower()
        except RuntimeError:
            continue
    return "no"


# --------------------------------------------------------------------------- presets


def _preset_dir_without_config() -> Path:
    """Where fastmam.config looks for presets (``PRESET_DIR``), for when it cannot be imported (no pydantic)."""
    here = Path(__file__).resolve().parent
    return here.parent / "configs" if (here.parent / "configs" / "tiny.yaml").is_file() else here / "presets"


def known_preset(name: str) -> None:
    """Raise ``UnknownPreset`` (the config loader's message) when ``name`` is neither a file nor a preset."""
    cfg_mod, _ = try_import("fastmam.config")
    if cfg_mod is not None:
        try:
            cfg_mod.resolve_preset(name)
        except cfg_mod.ConfigError as exc:
            raise UnknownPreset(str(exc)) from None
        return
    folder = _preset_dir_without_config()
    if not Path(name).is_file() and not (folder / f"{name}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml"))) or "none"
        raise UnknownPreset(f"config '{name}' is neither a file nor a preset; presets: {known}")


def _package_reason(module: str, what: str) -> tuple[str, str] | None:
    """(reason, install) when ``module`` does not import, else None."""
    mod, why = try_import(module)
    if mod is not None:
        return None
    install = next((p[2] for p in PACKAGES if p[1] == module), f"pip install {module}")
    return f"{what} needs {module}, which {why.replace('not installed', 'is not installed')}: {install}", install


def _need(out: PresetCheck, found: tuple[str, str] | None) -> None:
    """Record a (reason, install command) from ``_package_reason`` / ``_ops_problem``; None: nothing missing."""
    if found is not None:
        out.reasons.append(found[0])
        if found[1]:
            out.install.append(found[1])


def check_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> PresetCheck:
    """Whether ``fastmam/pretrain.py --config NAME [overrides]`` can run here: the checks that the run makes when it
    starts, made without training. Each rule names where in the code it comes from."""
    out = PresetCheck(name)

    cfg_mod, why = try_import("fastmam.config")
    if cfg_mod is None:  # fastmam.config imports pydantic and yaml at its top
        _need(out, _package_reason("pydantic", "fastmam.config (every preset)")
              or _package_reason("yaml", "fastmam.config"))
        if not out.reasons:
            out.reasons.append(f"fastmam.config {why}")
        _need(out, _package_reason("deepspeed", "fastmam/pretrain.py (a DeepSpeed engine for every run)"))
        out.notes.append("the rest of this preset's checks need fastmam.config: run the doctor again once it imports")
        return out
    torch = _torch()
    if torch is None:
        _need(out, _package_reason("torch", "training"))
        return out
    if _ops_problem() is not None:  # the model and its step are fastmam.ops
        _need(out, _ops_problem())
        return out
    try:  # config.load_config: unknown keys, bad values, cross-field rules
        cfg = cfg_mod.load_config(name, overrides)
    except cfg_mod.ConfigError as exc:
        out.reasons.append(str(exc))
        return out
    from fastmam.distributed import resolve_device

    # distributed.resolve_device: device=cuda without a visible GPU
    try:
        device_type = resolve_device(cfg.device).type
    except RuntimeError as exc:
        out.reasons.append(f"{exc} (this preset needs a CUDA GPU)")
        device_type = "cuda"  # check the rest as the GPU run it asks for
    gpus = _gpus()
    world = max(1, len(gpus)) if device_type == "cuda" else 1  # one rank per GPU under the deepspeed launcher
    # config.resolve_precision: bf16 needs a CUDA device
    try:
        precision = cfg_mod.resolve_precision(cfg, device_type)
    except cfg_mod.ConfigError as exc:
        out.reasons.append(f"{exc} (no GPU here)" if device_type == "cpu" else str(exc))
        precision = "fp32"
    old = [g for g in gpus if not g["bf16"]]
    if precision == "bf16" and old and device_type == "cuda":
        out.reasons.append(f"deepspeed.precision resolves to bf16 on this GPU, but {old[0]['name']} "
                           f"(sm_{old[0]['arch']}) has no bf16 arithmetic (sm_80+); set deepspeed.precision=fp32")
    out.summary.update(device=device_type, precision=precision, world_size=world)

    # pretrain.train / distributed.setup: `import deepspeed`
    _need(out, _package_reason("deepspeed", "fastmam/pretrain.py (a DeepSpeed engine for every run)"))

    # models.mam.configured_attention (when the model is built): package missing, CPU device, flash-attn in fp32
    att_ok = True
    try:
        from fastmam.models.mam import configured_attention

        configured_attention(cfg)
        out.summary["attention"] = cfg.model.attention
    except Exception as exc:  # (AttentionBackendError; the model package itself failing to import)
        att_ok = False
        out.reasons.append(str(exc))
        module = cfg.model.attention  # flash_attn or xformers: the package's module has the backend's name
        if module != "sdpa" and try_import(module)[0] is None:
            out.install.append(next(p[2] for p in PACKAGES if p[1] == module))

    _check_ops(cfg, device_type, out)
    _check_targets(cfg, out)
    _check_data(cfg, device_type, world, out)

    # pretrain.train: tqdm (logging.progress_bar); metrics.MetricsLogger: tensorboard is optional
    if cfg.logging.progress_bar:
        _need(out, _package_reason("tqdm", "logging.progress_bar"))
    if cfg.logging.tensorboard and try_import("torch.utils.tensorboard")[0] is None:
        out.notes.append("tensorboard is not installed: metrics go to metrics.jsonl only (pip install "
                         "'fastmam[tensorboard]', or logging.tensorboard=false)")
    # pretrain.train: RunFolderInUse
    from fastmam.checkpointing import latest_tag

    tag = latest_tag(cfg.run_dir / "checkpoints")
    if tag is not None:
        out.notes.append(f"{cfg.run_dir} already holds checkpoints (latest {tag}): pretrain needs --resume to continue "
                         "that run, or another name / output_dir")
    try:  # estimates: a failure here is not a reason the run would fail
        from fastmam.flops import model_flops

        out.summary["train_flops_per_micro_step"] = model_flops(cfg, cfg.data.batch_size).train
        if att_ok:  # the model is built for the estimate
            _check_memory(cfg, device_type, precision, world, gpus, out)
    except Exception as exc:
        out.notes.append(f"no memory / FLOP estimate: {_first_line(exc)}")
    out.runs = not out.reasons
    return out


def _check_ops(cfg, device_type: str, out: PresetCheck) -> None:
    """ops._backend.resolve at the first step (Pretrainer.forward): config.backend or FASTMAM_BACKEND may name a
    backend that is not built, or that needs CUDA tensors."""
    torch = _torch()
    from fastmam.ops import _backend

    used = list(STEP_OPS)
    if cfg.targets.appearance in ("pixel", "hog"):
        used.append(f"{cfg.targets.appearance}_target")
    if cfg.targets.motion in ("rgb_diff", "rgb_diff_dense"):
        used.append("rgb_diff_target")
    elif cfg.targets.motion == "trajectory":
        used.append("trajectory_target")
    backend = None if cfg.backend == "auto" else cfg.backend
    chosen, failed = {}, {}
    for op in used:
        try:
            chosen[op] = _backend.resolve(op, backend, torch.device(device_type))[0]
        except Exception as exc:  # (BackendUnavailableError; ValueError for a bad FASTMAM_BACKEND)
            # one reason for the ops that fail alike: the message with the op's name taken out
            failed.setdefault(str(exc).replace(f"fastmam.ops.{op}", "fastmam.ops.{}"), []).append(op)
    out.reasons.extend(msg.replace("fastmam.ops.{}", "fastmam.ops " + ", ".join(ops) if len(ops) > 1
                                   else f"fastmam.ops.{ops[0]}") for msg, ops in failed.items())
    if "triton" in chosen.values() and try_import("fastmam.kernels")[0] is None:
        out.reasons.append(f"the ops take the 'triton' backend here, but fastmam.kernels does not import "
                           f"({try_import('fastmam.kernels')[1]}): install fastmam (pip install -e .)")
    out.summary["ops"] = chosen


def _check_targets(cfg, out: PresetCheck) -> None:
    """models.mam.build_tokenizer -> vqgan.read_checkpoint: targets.appearance=vqgan with online codes reads the
    checkpoint when the model is built (MissingCheckpoint, exit status 2 of pretrain)."""
    tg = cfg.targets
    if tg.appearance != "vqgan" or tg.codes != "online":
        return
    path = tg.vqgan.checkpoint
    where = Path(path).expanduser() if path else None
    if where is not None and where.is_file():
        out.notes.append(f"the VQGAN checkpoint {path} exists; its keys and shapes are checked when the run starts")
        return
    try:
        from fastmam.models.vqgan import VQGAN_DOWNLOADS

        links = "; ".join(f"{k}: {v}" for k, v in VQGAN_DOWNLOADS.items())
    except Exception:
        links = "see the README's VQGAN targets section"
    what = "targets.vqgan.checkpoint is not set" if where is None else (
        f"the VQGAN checkpoint {path} does not exist (relative to {Path.cwd()})" if not where.is_absolute()
        else f"the VQGAN checkpoint {path} does not exist")
    out.reasons.append(f"{what}: targets.appearance='vqgan' needs a taming VQGAN's last.ckpt ({links}); set "
                       "targets.vqgan.checkpoint=<path>, or precompute codes (targets.codes=cached)")


def _check_data(cfg, device_type: str, world: int, out: PresetCheck) -> None:
    d = cfg.data
    per_rank = d.batch_size
    if d.source == "synthetic":
        # loader.StepBatchSampler: a dataset smaller than one global batch
        if d.num_samples < per_rank * world:
            out.reasons.append(f"data.num_samples={d.num_samples} is fewer than one global batch ({per_rank} x "
                               f"{world} ranks)")
        return

    # decode.probe opens every listed file with PyAV, whichever backend decodes (video.VideoDataset.plan)
    _need(out, _package_reason("av", "data.source=video (decode.probe reads every video's header with PyAV)"))
    if d.backend == "decord":  # decode.decoder
        _need(out, _package_reason("decord", "data.backend='decord'"))
    if d.backend == "dali":  # dali.DaliLoader: _import_dali, then _check_codec
        _need(out, _package_reason("nvidia.dali", "data.backend='dali'"))
    from fastmam.data.annotations import read_list

    try:  # loader.build_dataset -> annotations.read_list (AnnotationError, exit status 2 of pretrain)
        videos = read_list(d.train_list, d.data_root, d.list_format, d.hmdb51_split)
    except Exception as exc:  # (AnnotationError; an unreadable file)
        out.reasons.append(str(exc))
        videos = None
    if videos is not None:
        per_item = per_rank // d.repeated_sampling
        if len(videos) < per_item * world:  # loader.StepBatchSampler
            out.reasons.append(f"{d.train_list} lists {len(videos)} videos, fewer than one global batch ({per_item} "
                               f"videos x {world} ranks); add videos or lower data.batch_size")
    if d.backend == "dali" and device_type == "cpu":
        if videos is not None and try_import("av")[0] is not None:
            _check_dali_cpu_codec(videos, out)
        else:  # the codec could not be read here: say what it must be
            out.notes.append("DALI runs in its CPU mode here (no GPU): it reads only VP8, VP9 and MJPEG; H.264, HEVC "
                             "and AV1 videos (Kinetics' .mp4) need a GPU, or data.backend=pyav")
    if cfg.targets.codes == "cached":  # loader.build_dataset -> code_cache.CodeCache.for_config (CacheError)
        from fastmam.data.code_cache import CodeCache

        try:
            CodeCache.for_config(cfg)
        except Exception as exc:
            out.reasons.append(str(exc))


def _check_dali_cpu_codec(videos, out: PresetCheck, probes: int = 3) -> None:
    """dali.DaliLoader._check_codec: on the CPU, a codec other than VP8/VP9/MJPEG is UnsupportedCodec (exit status 2
    of pretrain). The codec of the first readable videos of the list stands for the dataset."""
    from fastmam.data.dali import CPU_CODECS
    from fastmam.data.decode import probe

    for path in itertools.islice(videos.paths, probes):
        try:
            codec = probe(path).codec
        except Exception:  # (a bad file is replaced by the loader: try the next one)
            continue
        if codec not in CPU_CODECS:
            out.reasons.append(f"{path} is {codec}: DALI's CPU decoder reads only VP8, VP9 and MJPEG, and there is no "
                               "GPU here; use data.backend=pyav, or a GPU")
        return


def _check_memory(cfg, device_type: str, precision: str, world: int, gpus: list[dict], out: PresetCheck) -> None:
    """memory.estimate_memory, the floor that pretrain prints at start, against the GPU's (or the host's) memory.
    The model is built on the meta device: parameter counts without allocating the weights."""
    torch = _torch()
    from fastmam.memory import count_parameters, estimate_memory, largest_block_params
    from fastmam.models.mam import Pretrainer

    class _Codes:  # stands in for the tokenizer (Pretrainer checks only these two), so no checkpoint is read
        codebook_size, downsample = cfg.targets.num_codes, cfg.model.patch

        def requires_grad_(self, _flag):
            return self

    with torch.device("meta"):
        model = Pretrainer(cfg, tokenizer=_Codes() if cfg.targets.uses_codes else None)
    params = count_parameters(model.model)["total"]
    est = estimate_memory(cfg, params, largest_block_params(model.model), world, device_type)
    out.summary.update(params=params, memory_floor_bytes=est.gpu_bytes, host_offload_bytes=est.cpu_bytes)
    if device_type == "cuda" and gpus:
        have, where = min(g["memory_bytes"] for g in gpus), f"the {gpus[0]['name']}'s"
    elif device_type == "cpu":
        have, where = _host_memory(), "host memory"
    else:
        return
    out.summary["memory_available_bytes"] = have
    need = est.gpu_bytes + (est.cpu_bytes if device_type == "cpu" else 0)
    line = (f"{params / 1e6:.1f} M parameters, at least {_gib(need)} per {'GPU' if device_type == 'cuda' else 'rank'} "
            f"of {_gib(have)} {where} (memory.estimate_memory: {precision}, batch {cfg.data.batch_size}, "
            f"ZeRO-{cfg.deepspeed.zero_stage}, {world} rank{'s' if world > 1 else ''})")
    if have and need > have:
        out.reasons.append(f"does not fit: {line}; lower data.batch_size, or use activation checkpointing / ZeRO / "
                           "offload (README: Scale)")
    else:
        out.summary["memory"] = line


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def probe_presets(rep: Report, args) -> None:
    s = "presets"
    rep.data["presets"] = {}
    for name in args.preset or ():
        try:
            check = check_preset(name, args.set or ())
        except Exception as exc:  # (a bug in a check must not hide the rest of the report)
            check = PresetCheck(name, reasons=[f"the check itself failed: {_first_line(exc)}"])
        rep.data["presets"][name] = asdict(check)
        if check.runs:
            sm = check.summary
            ops = sorted(set(sm.get("ops", {}).values()))
            flops = sm.get("train_flops_per_micro_step")
            detail = (f"can run here: {sm.get('device')}, {sm.get('precision')}, attention {sm.get('attention')}, "
                      f"ops {'/'.join(ops)}"
                      + (f", {flops / 1e12:.3g} TFLOP per micro-step (flops.model_flops)" if flops else "")
                      + (f"; {sm['memory']}" if sm.get("memory") else ""))
            rep.add(s, name, "ok", detail)
        else:
            reasons = f" {check.reasons[0]}" if len(check.reasons) == 1 else "".join(f"\n- {r}" for r in check.reasons)
            rep.add(s, name, "fail", f"cannot run here:{reasons}", "\n".join(dict.fromkeys(check.install)))
        for note in check.notes:
            rep.add(s, f"{name} (note)", "warn", note)
    if not args.preset:
        rep.add(s, "presets", "skip", "none named; --preset tiny vit_b ... checks whether each can run here")


PROBES = (probe_torch, probe_triton, probe_extension, probe_packages, probe_ops, probe_attention, probe_presets)
_SECTION_OF = dict(zip(PROBES, SECTIONS, strict=True))


def collect(args) -> Report:
    rep = Report()
    rep.data["fastmam"] = _fastmam_version()
    rep.data["argv"] = sys.argv[1:]
    for probe in PROBES:
        try:
            probe(rep, args)
        except Exception as exc:  # (one broken probe leaves the others' lines)
            rep.add(_SECTION_OF[probe], probe.__name__.removeprefix("probe_"), "error",
                    f"this probe failed: {_first_line(exc)}")
    return rep


def _fastmam_version() -> str:
    try:
        from fastmam import __version__

        return __version__
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------- output


def install_commands(rep: Report) -> list[str]:
    """The install command of every missing item, once each, in report order."""
    out: list[str] = []
    for line in rep.lines:
        if line.install and line.status in ("missing", "fail", "error"):
            out.extend(c for c in line.install.splitlines() if c not in out)
    return out


def render(rep: Report) -> str:
    width = max([len(line.name) for line in rep.lines] + [12]) + 2
    pad = " " * (2 + width + 1 + 6 + 1)  # under the detail column
    text = [f"fastmam {rep.data.get('fastmam')} doctor: what this machine has, and what runs here"]
    for section in SECTIONS:
        lines = [line for line in rep.lines if line.section == section]
        if not lines:
            continue
        text.append(f"\n[{section}]")
        for line in lines:
            detail = line.detail.replace("\n", "\n" + pad)
            text.append(f"  {line.name:<{width}} {_MARK[line.status]:<6} {detail}".rstrip())
    commands = install_commands(rep)
    text.append("\nto get the rest:" if commands else "\nto get the rest: nothing is missing")
    text.extend(f"  {c}" for c in commands)
    return "\n".join(text) + "\n"


def to_json(rep: Report, status: int) -> dict:
    sections = {s: [{k: v for k, v in asdict(line).items() if k != "section"} for line in rep.lines
                    if line.section == s] for s in SECTIONS}
    return {**rep.data, "sections": sections, "install": install_commands(rep), "exit_status": status}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    statuses = [textwrap.fill(what, 79, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
                for code, what in EXIT_STATUSES.items()]
    epilog = "exit status:\n" + "\n".join(statuses)
    p = argparse.ArgumentParser(prog="python -m fastmam.doctor", description=__doc__.split("\n\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", metavar="NAME", help="presets (configs/<name>.yaml) or YAML paths to check: "
                   "can each run on this machine, and if not, why")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a config override applied to every --preset, as on pretrain's command line (repeatable)")
    p.add_argument("--arch", type=parse_arch, default=None, help="compile the Triton kernels for this arch (90, sm_90, "
                   "9.0) instead of the local GPU's; on a machine without a GPU they are otherwise not checked")
    p.add_argument("--json", metavar="PATH", help="also write the whole report as JSON to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in args.preset or ():
        try:
            known_preset(name)
        except UnknownPreset as exc:
            print(f"fastmam.doctor: {exc}", file=sys.stderr)
            return 2
    rep = collect(args)
    status = 1 if any(not p["runs"] for p in rep.data.get("presets", {}).values()) else 0
    sys.stdout.write(render(rep))
    if status:
        bad = [n for n, p in rep.data["presets"].items() if not p["runs"]]
        sys.stdout.write(f"\nexit status 1: {', '.join(bad)} cannot run here (reasons under [presets])\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(rep, status), indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
