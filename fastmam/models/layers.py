"""Transformer layers of the video ViT: pre-norm self-attention blocks (VideoMAE's parameterization)
and CAE-style cross-attention blocks for the regressor. The attention op itself is a backend function
(``fastmam.models.attention``: SDPA by default) chosen once, when a layer is built."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attention import sdpa_attention

LN_EPS = 1e-6


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed sinusoid position table -> (num_positions, dim) float32.

    Entry (n, j) is sin (j even) or cos (j odd) of ``n / 10000 ** (2 * (j // 2) / dim)``,
    computed in float64 like VideoMAE's numpy code, so features match its encoder.
    """
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    j = np.arange(dim)
    angles = pos / np.power(10000, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angles), np.cos(angles))
    return torch.tensor(table, dtype=torch.float32)  # honours a torch.device("meta") context


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's qkv parameterization (q and v biases, no k bias).

    ``attend``: the attention op, (B, heads, N, head_dim) q, k, v -> out (``attention.attention_function``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attend: Callable = sdpa_attention):
        super().__init__()
        self.num_heads = num_heads
        self.attend = attend
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, dim) -> (B, N, dim)."""
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries (B, Nq, dim) attend to keys/values (B, Nk, dim)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attend: Callable = sdpa_attention):
        super().__init__()
        self.num_heads = num_heads
        self.attend = attend
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, nq, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = self.attend(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

    ``drop_path`` > 0 (fine-tuning): each residual branch is dropped per sample with that probability in training
    (stochastic depth, timm's ``DropPath``); 0 adds nothing to the module or its state dict."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attend: Callable = sdpa_attention, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = None
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_path is not None:
            x = x + self.drop_path(self.attn(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """CAE regressor block: queries attend to [visible latents, queries] (pre-norm), then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attend: Callable = sdpa_attention):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = CrossAttention(dim, num_heads, qkv_bias, attend)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """queries: (B, Nm, dim); latents: (B, Nv, dim) with positions added -> (B, Nm, dim)."""
        context = self.norm_kv(torch.cat([latents, queries], dim=1))
        queries = queries + self.attn(self.norm_q(queries), context)
        return queries + self.mlp(self.norm2(queries))


def init_weights(module: nn.Module) -> None:
    """MAE/VideoMAE init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
