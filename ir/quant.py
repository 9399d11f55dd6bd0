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
        c = (p[..., None] >> (torch.arange(per, dtype=torch.int32, device=packed.device) * bits)) & ((1 << bits) - 1)
        return c.reshape(n, -1)[:, :k]
    stream = ((p[..., None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1).reshape(n, -1)
    stream = stream[:, : k * bits].reshape(n, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1)


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


# -- non-uniform (lookup-table) storage, SqueezeLLM's format ------------------------------------
# `qweight` uint8 [N, ceil(K*bits/8)]: codes packed as above; `lut` float16 [N, 2**bits]: the
# values of each output row's codes. W_hat[n, k] = lut[n, code[n, k]].

def weighted_kmeans(w: torch.Tensor, weight: torch.Tensor, k: int, iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of every row of W [N, K] at once, each value counted with its `weight` (>= 0):
    centroids start at the weighted quantiles (1/2k, 3/2k, ...) and follow Lloyd's iterations
    until no code changes; a centroid left with no values (duplicates at the start, say) moves to
    the value its row reconstructs worst. Returns (centroids [N, k] sorted, codes [N, K] int64)."""
    w = w.double()
    s = weight.double().clamp(min=0) + 1e-12 * weight.double().abs().amax(1, keepdim=True).clamp(min=1e-30)
    order = torch.argsort(w, dim=1)
    cum = torch.cumsum(torch.gather(s, 1, order), 1)
    targets = (torch.arange(k, dtype=w.dtype) + 0.5) / k * cum[:, -1:]
    idx = torch.searchsorted(cum, targets).clamp(max=w.shape[1] - 1)
    c = torch.gather(torch.gather(w, 1, order), 1, idx)
    codes = None
    for _ in range(iters):
        c = torch.sort(c, dim=1).values
        new = nearest_codes(w, c)
        if codes is not None and torch.equal(new, codes):
            break
        codes = new
        num = torch.zeros_like(c).scatter_add_(1, codes, s * w)
        den = torch.zeros_like(c).scatter_add_(1, codes, s)
        empty = den == 0
        c = torch.where(empty, c, num / den.clamp(min=1e-300))
        rows = empty.any(1).nonzero()[:, 0]
        if len(rows):
            err = s[rows] * (w[rows] - torch.gather(c[rows], 1, codes[rows])) ** 2
            c[rows, empty[rows].float().argmax(1)] = torch.gather(w[rows], 1, err.argmax(1, keepdim=True))[:, 0]
            codes = None
    return torch.sort(c, dim=1).values, nearest_codes(w, torch.sort(c, dim=1).values)


def nearest_codes(w: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Code of the nearest table entry for every value of W [N, K] (lut [N, L] sorted per row)."""
    lut = lut.double()
    return torch.searchsorted(((lut[:, 1:] + lut[:, :-1]) / 2).contiguous(), w.double().contiguous())


@torch.library.custom_op("lowbit::dequantize_lut", mutates_args=())
def dequantize_lut(qweight: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Reference dequantization of the lookup-table layout to a float32 [N, K] weight."""
    codes = unpack(qweight, bits, in_features).long()
    return torch.gather(lut.to(torch.float32), 1, codes)


@dequantize_lut.register_fake
def _(qweight, lut, bits, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


# -- sparse outliers (dense-and-sparse) --------------------------------------------------------
# CSR of an [N, K] matrix: `crow` int32 [N+1], `col` int32 [nnz], `val` float16 [nnz].
# The sparse part is added to the (dequantized) dense weight: W = D + S.

def to_csr(mask: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols = mask.nonzero(as_tuple=True)     # row-major order
    crow = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=mask.shape[0]), 0)
    return crow.to(torch.int32), cols.to(torch.int32), w[rows, cols].to(torch.float16)


def csr_rows(crow: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(crow) - 1), torch.diff(crow.long()))


@torch.library.custom_op("lowbit::sparse_add", mutates_args=())
def sparse_add(w: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """W + S for a CSR matrix S of W's shape (reference; kernels add S x to the product instead)."""
    out = w.clone()
    out[csr_rows(crow), col.long()] += val.to(w.dtype)
    return out


@sparse_add.register_fake
def _(w, crow, col, val):
    return torch.empty_like(w)


sparse_add.register_autograd(lambda ctx, grad: (grad, None, None, None))


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
