"""Rotary position embeddings (Su et al., 2021, "RoFormer"), as Llama and its kin use them.

GPT-2 adds a learned position vector to each token; RoPE adds nothing to the residual stream.
Inside attention the head dimension d is seen as d/2 planes (dim i paired with dim i + d/2, the
Hugging Face layout) and position m turns plane i of q and of k by the angle m * w_i:

    rope(x, m) = x * cos(m w) + rotate_half(x) * sin(m w),   rotate_half([x1, x2]) = [-x2, x1]
    w_i = theta^(-2i/d),  i = 0 .. d/2 - 1

    q at position m, k at position n, plane i turned by m w_i and n w_i:
    rope(q, m) . rope(k, n) = sum_i |q_i| |k_i| cos(phi_i + (m - n) w_i)   (phi_i: their angle unturned)

so the score of query m and key n depends on their positions only through m - n: attention sees
relative positions. Fast planes (small i) resolve nearby tokens, slow ones far ones.

Context extension (``RopeScaling``) slows the planes down so positions past the trained context
turn by angles the model has seen: "linear" (position interpolation, Chen et al., 2023) divides
every w_i by ``factor``; "llama3" (Llama 3.1) keeps the fast planes, divides the slow ones
(wavelength 2 pi / w_i above original / low_freq_factor) by ``factor``, and blends in between.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How a checkpoint stretches RoPE past the context it was trained on (HF ``rope_scaling``)."""
    type: str  # "linear" (position interpolation) or "llama3" (Llama 3.1's frequency-dependent one)
    factor: float  # how many times longer the context becomes
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are scaled fully
    high_freq_factor: float = 4.0  # llama3: wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3: the context the model was trained on

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ValueError(f"rope scaling type {self.type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if not self.factor > 0:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"original_max_position_embeddings must be >= 1, got "
                             f"{self.original_max_position_embeddings}")


def frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None, device=None) -> torch.Tensor:
    """The angular speed w_i of each plane, (head_dim / 2,), in fp32."""
    w = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    s = scaling
    if s is None:
        return w
    if s.type == "linear":  # position m is read as m / factor
        return w / s.factor
    wavelen = 2 * math.pi / w  # llama3
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor  # above: slowed by factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor  # below: kept
    scaled = torch.where(wavelen > low_wavelen, w / s.factor, w)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)  # 0 at low_wavelen, 1 at high_wavelen
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, scaled)


def cos_sin(w: torch.Tensor, start: int, T: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles of positions start .. start + T - 1, each (T, head_dim): computed
    in fp32 from the frequencies ``w`` (no table to keep, none to lose precision when the model
    is cast), then cast to ``dtype``."""
    pos = torch.arange(start, start + T, device=w.device, dtype=torch.float)
    angles = pos[:, None] * w[None, :]  # (T, hs/2)
    emb = torch.cat([angles, angles], dim=-1)  # (T, hs): dims i and i + hs/2 share plane i's angle
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # each (..., hs/2)
    return torch.cat([-x2, x1], dim=-1)  # (..., hs)


def apply(x, cos, sin):
    """Turn each plane of x (B, nh, T, hs) by its position's angle (cos, sin: (T, hs))."""
    return x * cos + rotate_half(x) * sin
