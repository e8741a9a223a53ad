"""Appearance tokenizers: frames -> code indices aligned with the model's tokens.

The interface the VQGAN tokenizer implements. ``RandomTokenizer`` is a fixed random one whose
codes depend on content (nearest random codeword of a random patch projection): it exercises
the cross-entropy path with no checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

FRAME_CHOICES = ("first", "middle", "all")


class AppearanceTokenizer(nn.Module):
    """frames (N, H, W, C) uint8 -> codes (N, H/downsample, W/downsample) int64 in [0, codebook_size).

    Subclasses set ``codebook_size`` and ``downsample`` (the patch side the codes align with) and
    implement ``encode``. Tokenizers are frozen: they run without grad and hold no trained state
    that the pretraining optimizer touches.
    """

    codebook_size: int
    downsample: int

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def tubelet_frame_index(tubelet: int, frame: str) -> int:
    """Which frame of each tubelet gets a code: 'first' -> 0, 'middle' -> tubelet // 2."""
    if frame not in FRAME_CHOICES[:2]:
        raise ValueError(f"code frame '{frame}' has no single frame index; expected one of {FRAME_CHOICES[:2]}")
    return 0 if frame == "first" else tubelet // 2


def code_frames(num_frames: int, tubelet: int, frame: str) -> list[int]:
    """Clip frames that get codes, in order: one per tubelet ('first', 'middle') or every frame ('all')."""
    if frame not in FRAME_CHOICES:
        raise ValueError(f"code frame '{frame}' is not supported; expected one of {FRAME_CHOICES}")
    if frame == "all":
        return list(range(num_frames))
    return list(range(tubelet_frame_index(tubelet, frame), num_frames, tubelet))


def select_code_frames(x: torch.Tensor, tubelet: int, frame: str) -> torch.Tensor:
    """The ``code_frames`` of ``x`` (B, T, ...) along dim 1, as a strided view (no index tensor, no copy)."""
    idx = code_frames(x.shape[1], tubelet, frame)
    return x if frame == "all" else x[:, idx[0] :: tubelet]


def codes_per_token(tubelet: int, frame: str) -> int:
    """Codes each token is trained on: t for 'all', else 1."""
    return tubelet if frame == "all" else 1


def token_codes(frame_codes: torch.Tensor, tubelet: int, frame: str) -> torch.Tensor:
    """Codes of the ``code_frames`` of a clip -> codes aligned with tokens, order (time, row, col).

    frame_codes: (B, F, h, w) integer, F = len(code_frames(T, tubelet, frame)). Returns (B, N) for 'first'
    and 'middle' (token (i, r, c) gets cell (r, c) of frame ``i * t + offset``), and (B, N, t) for 'all'
    (the codes of the token's t frames, in frame order)."""
    b, f, h, w = frame_codes.shape
    k = codes_per_token(tubelet, frame)
    if f % k:
        raise ValueError(f"{f} code frames do not split into tubelets of {tubelet} (code_frame '{frame}')")
    if k == 1:
        return frame_codes.reshape(b, -1)
    return frame_codes.view(b, f // k, k, h, w).permute(0, 1, 3, 4, 2).reshape(b, -1, k)


@torch.no_grad()
def clip_codes(tokenizer: AppearanceTokenizer, clip: torch.Tensor, tubelet: int, frame: str = "first") -> torch.Tensor:
    """Codes aligned with tokens: clip (B, T, H, W, C) uint8 -> (B, N) int64, or (B, N, t) for frame 'all'.

    Only the ``code_frames`` are encoded; see ``token_codes`` for the alignment.
    """
    b, t, h, w, c = clip.shape
    if h % tokenizer.downsample or w % tokenizer.downsample:
        raise ValueError(f"frames of {h}x{w} do not tile into the tokenizer's {tokenizer.downsample}-pixel cells")
    frames = select_code_frames(clip, tubelet, frame)  # (B, F, H, W, C)
    codes = tokenizer.encode(frames.reshape(-1, h, w, c))  # (B*F, H/f, W/f)
    return token_codes(codes.view(b, frames.shape[1], *codes.shape[1:]), tubelet, frame)


class RandomTokenizer(AppearanceTokenizer):
    """A fixed random tokenizer for tests and smoke runs, deterministic by seed.

    Each f x f patch (in [-0.5, 0.5] units) is projected to ``embed_dim`` and assigned the code of
    the most similar of ``codebook_size`` random unit codewords. Weights are non-persistent
    buffers: rebuilt from the seed, never saved in checkpoints.
    """

    def __init__(self, codebook_size: int, downsample: int, channels: int = 3, embed_dim: int = 32, seed: int = 0):
        super().__init__()
        self.codebook_size = codebook_size
        self.downsample = downsample
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(downsample * downsample * channels, embed_dim, generator=g, device="cpu")
        codebook = torch.randn(codebook_size, embed_dim, generator=g, device="cpu")
        codebook = torch.nn.functional.normalize(codebook, dim=-1)
        self.register_buffer("proj", proj / proj.shape[0] ** 0.5, persistent=False)
        self.register_buffer("codebook", codebook, persistent=False)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        n, h, w, c = frames.shape
        f = self.downsample
        x = frames.reshape(n, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h // f, w // f, -1)
        z = (x.to(torch.float32) / 255.0 - 0.5) @ self.proj.float()
        return (z @ self.codebook.float().t()).argmax(dim=-1)
