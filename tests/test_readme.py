"""Every Python block of README.md runs, as written, on small inputs: the README cannot rot.

Each block is preceded by ``<!-- readme-test: NAME -->``; NAME picks what the block may assume exists (the
variables a user's own code has at that point, made here small): ``standalone`` (nothing), ``dropin``
(VideoMAE's pretraining step: its normalized batch, tube mask, Conv3d patch embedding, positional table,
decoder output and head) and ``export`` (an exported tiny run at the path the block names, and its input).
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (\w+) -->\n)?```python\n(.*?)```", re.S)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blocks() -> list[tuple[str | None, str, int]]:
    text = README.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in BLOCK.finditer(text)]


def test_every_python_block_is_run():
    found = blocks()
    assert found, "README.md has Python blocks"
    for setup, _, line in found:
        assert setup in SETUPS, (f"README.md line {line}: a ```python block needs a `<!-- readme-test: NAME -->` line "
                                 f"before it, NAME one of {sorted(SETUPS)} (tests/test_readme.py)")


def _standalone(tmp_path):
    return {}


def _dropin(tmp_path):
    """VideoMAE's variables at its loss, for a (2, 3, 4, 32, 32) batch: N = 2 x 2 x 2 = 8 tokens."""
    g = torch.Generator().manual_seed(0)
    b, t, d = 2, 4, 24
    videos = (torch.rand(b, 3, t, 32, 32, generator=g) - torch.tensor(MEAN).view(3, 1, 1, 1)) / torch.tensor(
        STD).view(3, 1, 1, 1)
    hidden = torch.rand(b, 4, generator=g).argsort(1) < int(0.9 * 4)  # VideoMAE's TubeMaskingGenerator
    bool_masked_pos = hidden.repeat(1, t // 2)
    nm = int(bool_masked_pos[0].sum())
    conv = torch.nn.Conv3d(3, d, (2, 16, 16), (2, 16, 16))
    head = torch.nn.Linear(16, 2 * 16 * 16 * 3)
    return dict(B=b, T=t, MEAN=MEAN, STD=STD, videos=videos, bool_masked_pos=bool_masked_pos, conv=conv,
                pos_embed=torch.randn(1, 8, d, generator=g), decoder_hidden=torch.randn(b, nm, 16, generator=g),
                head=head, torch=torch)


def _export(tmp_path, monkeypatch=None):
    pytest.importorskip("transformers")
    from fastmam.config import load_config
    from fastmam.export import export
    from tests.test_export import train_tiny

    run = train_tiny(tmp_path / "runs" / "tiny")
    export(run, tmp_path / "exported" / "mam2_vit_b")
    cfg = load_config("tiny")
    d = cfg.data
    pixel_values = torch.randn(1, d.num_frames, 3, d.img_size, d.img_size)
    return dict(pixel_values=pixel_values)


SETUPS = {"standalone": _standalone, "dropin": _dropin, "export": _export}


@pytest.mark.parametrize("setup,code,line", blocks(), ids=[f"line{line}" for _, _, line in blocks()])
def test_block_runs(setup, code, line, tmp_path, monkeypatch):
    if setup not in SETUPS:
        pytest.fail(f"README.md line {line}: no `<!-- readme-test: NAME -->` before the block")
    monkeypatch.chdir(tmp_path)
    namespace = SETUPS[setup](tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    if setup == "dropin":  # the block's result, checked: it is VideoMAE's loss on these inputs
        assert namespace["loss"].dtype == torch.float32 and torch.isfinite(namespace["loss"])
        assert namespace["x_vis"].shape == (2, int((~namespace["bool_masked_pos"][0]).sum()), 24)
