"""Activation and KV-cache quantization: per-token dynamic ranges with integer rounding, as the
simulated ops quantized graphs call (`lowbit.quantize_tokens`) and as a quantized KV cache stores
them (`lowbit.kv_quantize` / `lowbit.kv_dequantize`). Weight formats live in ir/formats/."""
from __future__ import annotations

import torch


# -- dynamic activation / KV-cache quantization (simulated) -----------------------------------

def _token_codes(x, bits, group, sym, clip, rnd=torch.round):
    """Integer codes (as floats), scale and zero point per token and group along x's last dim, the
    groups as a trailing axis: what quantize_tokens rounds to and what kv_quantize stores."""
    d = x.shape[-1]
    g = d if group == -1 else group
    xg = x.float().reshape(*x.shape[:-1], d // g, g)
    if sym:
        qmax = (1 << (bits - 1)) - 1
        scale = (xg.abs().amax(-1, keepdim=True) * clip / qmax).clamp(min=1e-10)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return torch.clamp(rnd(xg / scale), -qmax - 1, qmax) + zero, scale, zero
    qmax = (1 << bits) - 1
    lo = xg.amin(-1, keepdim=True).clamp(max=0) * clip
    hi = xg.amax(-1, keepdim=True).clamp(min=0) * clip
    scale = ((hi - lo) / qmax).clamp(min=1e-10)
    zero = rnd(-lo / scale)
    return torch.clamp(rnd(xg / scale) + zero, 0, qmax), scale, zero


@torch.library.custom_op("lowbit::quantize_tokens", mutates_args=())
def quantize_tokens(x: torch.Tensor, bits: int, group: int, sym: bool, clip: float) -> torch.Tensor:
    """Dynamic quantize-dequantize of X along its last dim, per token and group of `group` values
    (-1: the whole dim), with integer rounding: what an int kernel or a quantized KV cache sees.
    Ranges come from the values themselves times `clip`: symmetric, codes in [-2^(b-1), 2^(b-1)-1]
    with scale max|x| / (2^(b-1)-1); asymmetric, [min, max] (widened to hold 0) over 2^b - 1 steps."""
    codes, scale, zero = _token_codes(x, bits, group, sym, clip)
    return ((codes - zero) * scale).reshape(x.shape).to(x.dtype)


@quantize_tokens.register_fake
def _(x, bits, group, sym, clip):
    return torch.empty_like(x)


quantize_tokens.register_autograd(lambda ctx, grad: (grad, None, None, None, None))   # straight through


def _round_ste(v):
    return v + (torch.round(v) - v).detach()


def quantize_tokens_lsq(x: torch.Tensor, bits: int, group: int, sym: bool, clip: float) -> torch.Tensor:
    """quantize_tokens' values, with LSQ's gradient: rounding passes gradients straight through,
    but the ranges stay differentiable, so the gradient also says how each token's min and max
    (the values that set its step) move the loss. Used where rotations are learned."""
    codes, scale, zero = _token_codes(x, bits, group, sym, clip, rnd=_round_ste)
    return ((codes - zero) * scale).reshape(x.shape).to(x.dtype)


# -- quantized KV cache (the decoder's past/present) ---------------------------------------------
# Per token and group of `group` values (-1: the whole head) along head_dim D: codes uint8
# [B, H, S, D] (for bits <= 4, two per byte: [B, H, S, D/2], code 2j in the low nibble), scale
# float32 [B, H, S, G], zero point uint8 [B, H, S, G] (2^(bits-1) for symmetric). Dequantizing
# gives exactly lowbit.quantize_tokens' output, so a cached decoder matches the reference graph.
@torch.library.custom_op("lowbit::kv_quantize", mutates_args=())
def kv_quantize(x: torch.Tensor, bits: int, group: int, sym: bool, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scale, zero = _token_codes(x, bits, group, sym, clip)
    codes = codes.reshape(x.shape)
    if bits <= 4:
        codes = codes[..., 0::2] + 16 * codes[..., 1::2]
    return codes.to(torch.uint8), scale.squeeze(-1), zero.squeeze(-1).to(torch.uint8)


@kv_quantize.register_fake
def _(x, bits, group, sym, clip):
    d = x.shape[-1]
    n = d // (d if group == -1 else group)
    return (x.new_empty(*x.shape[:-1], d // 2 if bits <= 4 else d, dtype=torch.uint8),
            x.new_empty(*x.shape[:-1], n, dtype=torch.float32), x.new_empty(*x.shape[:-1], n, dtype=torch.uint8))


@torch.library.custom_op("lowbit::kv_dequantize", mutates_args=())
def kv_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    c = codes.float()
    if bits <= 4:
        hi = torch.floor(c / 16)
        c = torch.stack((c - 16 * hi, hi), -1).flatten(-2)
    cg = c.reshape(*c.shape[:-1], scale.shape[-1], -1)
    return ((cg - zero.float()[..., None]) * scale[..., None]).reshape(c.shape)


@kv_dequantize.register_fake
def _(codes, scale, zero, bits):
    return codes.new_empty(*codes.shape[:-1], codes.shape[-1] * (2 if bits <= 4 else 1), dtype=torch.float32)
