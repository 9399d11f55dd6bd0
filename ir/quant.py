"""Group-wise integer weight storage: the packed layout, the quantizer math and the reference
dequantize op that quantized graphs call.

Layout (what every packer in lowbit writes and every kernel reads):
- A linear weight W has shape [N, K] (out_features, in_features). Groups run along K: group g
  covers columns [g*G, min((g+1)*G, K)); `group=-1` means one group per row (per-channel).
  When K is not a multiple of G the last group is shorter (ceil(K/G) groups); nothing is padded
  in W and no column is dropped.
- `qweight` uint8 [N, ceil(K*bits/8)]: each row is a little-endian bit stream of K unsigned
  codes of `bits` bits; code k occupies bits [k*bits, (k+1)*bits) of the row, so for 4 bits
  code 2j is the low nibble of byte j (the MatMulNBits order).
- `scales` float16 [N, n_groups].
- asymmetric: `zeros` uint8 [N, ceil(n_groups*bits/8)], codes packed like qweight.
  symmetric: no zeros tensor; the zero point is 2**(bits-1) for every group.
- W_hat[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int  # -1: per output channel
    sym: bool

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group != -1 and self.group < 1:
            raise ValueError(f"group must be -1 or a positive size, got {self.group}")

    def group_size(self, k: int) -> int:
        return k if self.group == -1 else self.group

    def n_groups(self, k: int) -> int:
        return math.ceil(k / self.group_size(k))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes in [0, 2**bits) -> uint8 [N, ceil(K*bits/8)] little-endian bit rows."""
    n, k = codes.shape
    c = codes.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        c = torch.nn.functional.pad(c, (0, (-k) % per)).reshape(n, -1, per)
        return (c << (torch.arange(per, dtype=torch.int32) * bits)).sum(-1).to(torch.uint8)
    stream = ((c[..., None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(n, k * bits)
    stream = torch.nn.functional.pad(stream, (0, (-k * bits) % 8)).reshape(n, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 rows -> int32 [N, K] codes."""
    n = packed.shape[0]
    p = packed.to(torch.int32)
    if 8 % bits == 0:
        per = 8 // bits
        c = (p[..., None] >> (torch.arange(per, dtype=torch.int32) * bits)) & ((1 << bits) - 1)
        return c.reshape(n, -1)[:, :k]
    stream = ((p[..., None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(n, -1)
    stream = stream[:, : k * bits].reshape(n, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, n_groups, g], the short last group padded by repeating its last column
    (repeats change neither min nor max, so scales are those of the real columns)."""
    n, k = w.shape
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g)


def _fit(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points per group from min/max. wg: [N, G, g] float64."""
    qmax = (1 << spec.bits) - 1
    if spec.sym:
        half = 1 << (spec.bits - 1)
        scale = wg.abs().amax(-1) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, 1)).clamp(0, qmax)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), zero


def _codes(wg, scale, zero, bits):
    return torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)


def fit_groups(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False, grid: int = 20,
               min_ratio: float = 0.5, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scale [N, G] and zero point [N, G] for W [N, K] (math in `dtype`).

    clip_search: shrink each group's range by ratios in [min_ratio, 1] and keep, per group, the
    ratio with the least squared reconstruction error (scales are rounded to fp16 first, as
    stored)."""
    wg = _grouped(w.to(dtype), spec.group_size(w.shape[1]))
    scale, zero = _fit(wg, spec)
    if not clip_search:
        return scale.half().to(dtype), zero
    best_err = torch.full(scale.shape, math.inf, dtype=dtype)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = _fit(wg * ratio, spec)
        s = s.half().to(dtype)
        err = ((_codes(wg, s, z, spec.bits) - z[..., None]) * s[..., None] - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale.half().to(dtype), zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes [N, K] (int32) of W [N, K] under per-group scale/zero [N, G] (in scale's dtype)."""
    n, k = w.shape
    codes = _codes(_grouped(w.to(scale.dtype), spec.group_size(k)), scale, zero, spec.bits)
    return codes.reshape(n, -1)[:, :k].to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W_hat [N, K] from unpacked codes and per-group scale/zero [N, G], in scale's dtype."""
    k = codes.shape[1]
    g = torch.arange(k) // spec.group_size(k)
    return (codes.to(scale.dtype) - zero[:, g]) * scale[:, g]


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> torch.Tensor:
    """RTN quantize-dequantize of W in W's dtype, passing gradients straight through (STE)."""
    with torch.no_grad():
        scale, zero = fit_groups(w.detach(), spec, clip_search, dtype=w.dtype)
        w_hat = dequantize_codes(quantize(w.detach(), scale, zero, spec), scale, zero, spec)
    return w + (w_hat - w).detach()


@dataclass
class PackedWeight:
    """The tensors one quantized linear stores (see the layout above)."""
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec
    in_features: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros)
                   if t is not None)


def packed_from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> PackedWeight:
    zeros = None if spec.sym else pack(zero.to(torch.int32), spec.bits)
    return PackedWeight(pack(codes, spec.bits), scale.to(torch.float16), zeros, spec, codes.shape[1])


def pack_weight(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> PackedWeight:
    """Round-to-nearest."""
    scale, zero = fit_groups(w, spec, clip_search)
    return packed_from_codes(quantize(w, scale, zero, spec), scale, zero, spec)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group: int, in_features: int) -> torch.Tensor:
    """Reference dequantization of the packed layout above to a float32 [N, K] weight."""
    k = in_features
    g = k if group == -1 else group
    codes = unpack(qweight, bits, k).to(torch.float32)
    col_group = torch.arange(k) // g
    if zeros is None:
        zero = torch.full((1, 1), float(1 << (bits - 1)))
    else:
        zero = unpack(zeros, bits, scales.shape[1]).to(torch.float32)[:, col_group]
    return (codes - zero) * scales.to(torch.float32)[:, col_group]


@dequantize.register_fake
def _(qweight, scales, zeros, bits, group, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)
