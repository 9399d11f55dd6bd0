"""Uniform (affine, group-wise) integer weights: RTN, GPTQ and FineQuant write them.

Layout (what lowbit's packers write and every kernel reads):
- A linear weight W has shape [N, K] (out_features, in_features). Groups run along K: group g
  covers columns [g*G, min((g+1)*G, K)); `group=-1` means one group per row (per-channel).
  When K is not a multiple of G the last group is shorter (ceil(K/G) groups); nothing is padded
  in W and no column is dropped.
- `qweight` uint8 [N, ceil(K*bits/8)]: the code streams of formats/base.py.
- `scales` float16 [N, n_groups].
- asymmetric: `zeros` uint8 [N, ceil(n_groups*bits/8)], codes packed like qweight.
  symmetric: no zeros tensor; the zero point is 2**(bits-1) for every group.
- W_hat[n, k] = (code[n, k] - zero[n, k // G]) * scale[n, k // G]   (op `lowbit.dequantize`).
- asymmetric with offset "min" (llama.cpp's Q4_1/Q5_1 encoding): `zeros` is float16 [N, n_groups],
  each group's minimum m, and W_hat[n, k] = code[n, k] * scale[n, k // G] + m[n, k // G] in
  float32 (the group's range [min, max] over 2^bits - 1 steps, not widened to hold 0).

Kernel layouts its lowering writes:
- MatMulNBits (onnxruntime's `com.microsoft::MatMulNBits`; targets onnx-ort and cuda):
  `B` uint8 [N, n_blocks, block_size * bits / 8], codes in blocks of `block_size` along K packed
  like the code streams, K padded up to n_blocks * block_size (padding codes never read);
  `scales` [N * n_blocks] in the activation dtype, row-major; `zero_points` uint8
  [N * ceil(n_blocks * bits / 8)], each row's block zero points packed the same way, absent for
  symmetric weights. block_size is a power of two >= 16: a lowbit group that is not one
  (per-channel, or 96) is written as blocks of its largest power-of-two divisor with the group's
  scale repeated, which is exact; a per-channel row of K <= 256 without such a divisor (K = 172)
  is one padded block.
- Blocked DequantizeLinear (opset 21; targets onnx-qdq and trt, and every weight MatMulNBits
  cannot hold): codes [K, N] (the transposed weight; int8 signed codes code - 2^(bits-1) for
  symmetric weights, uint8 with zero points otherwise), scales float32 [ceil(K / block), N], zero
  points uint8 [ceil(K / block), N]; the export stores 2- to 4-bit codes and zero points as ONNX
  INT4/UINT4. DequantizeLinear has integer zero points only: offset-"min" weights lower to
  MatMulNBits, whose zero points may be float (-min / scale per block), and nothing else."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.ir.errors import LowbitError

from .base import Packed, WeightFormat, base_name, four_bit, pack, plus_bias, unpack, weight_of


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int  # -1: per output channel
    sym: bool
    offset: str = "zero"   # asymmetric: an integer zero point ("zero") or an fp16 group minimum ("min");
    #                        symmetric: "signed" takes the scale from the group's signed extreme, -x/2^(bits-1),
    #                        so that it lands on the lowest code and all 2^bits codes are used (llama.cpp's Q4_0
    #                        rule; the scale may be negative), instead of max|x| / (2^(bits-1) - 1)

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group != -1 and self.group < 1:
            raise ValueError(f"group must be -1 or a positive size, got {self.group}")
        if self.offset not in ("zero", "min", "signed"):
            raise ValueError(f"offset must be zero, min or signed, got {self.offset}")
        if self.offset == "min" and self.sym:
            raise ValueError("offset=min is an asymmetric grid: use it with sym=false")
        if self.offset == "signed" and not self.sym:
            raise ValueError("offset=signed is a symmetric grid: use it with sym=true")

    def group_size(self, k: int) -> int:
        return k if self.group == -1 else self.group

    def n_groups(self, k: int) -> int:
        return math.ceil(k / self.group_size(k))


# -- the quantizer math ------------------------------------------------------------------------------
def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, n_groups, g], the short last group padded by repeating its last column
    (repeats change neither min nor max, so scales are those of the real columns)."""
    n, k = w.shape
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g)


def _fit(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points per group from min/max. wg: [N, G, g] float64. Offset "min": the
    scale and minimum are rounded to fp16 as stored, and the zero point is the float -min / scale."""
    qmax = (1 << spec.bits) - 1
    if spec.offset == "min":
        lo = wg.amin(-1).half().to(wg.dtype)
        scale = ((wg.amax(-1) - lo) / qmax).half().to(wg.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, -lo / scale
    if spec.sym:
        half = 1 << (spec.bits - 1)
        if spec.offset == "signed":
            scale = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0] / -half
        else:
            scale = wg.abs().amax(-1) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / qmax
        zero = torch.round(-lo / torch.where(scale > 0, scale, 1)).clamp(0, qmax)
    return torch.where(scale != 0, scale, torch.ones_like(scale)), zero


def to_grid(values, scale, zero, spec: QuantSpec):
    """Codes of `values` under scale and zero point of the same shape (an integer zero point is
    added after rounding, a float one, offset "min", before)."""
    q = values / scale   # then in place: one temporary the size of `values`
    q = q.add_(zero).round_() if spec.offset == "min" else q.round_().add_(zero)
    return q.clamp_(0, (1 << spec.bits) - 1)


def _codes(wg, scale, zero, spec):
    return to_grid(wg, scale[..., None], zero[..., None], spec)


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
    best_err = torch.full_like(scale, math.inf)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        s, z = _fit(wg * ratio, spec)
        s = s.half().to(dtype)
        err = ((_codes(wg, s, z, spec) - z[..., None]) * s[..., None] - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale.half().to(dtype), zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes [N, K] (int32) of W [N, K] under per-group scale/zero [N, G] (in scale's dtype)."""
    n, k = w.shape
    codes = _codes(_grouped(w.to(scale.dtype), spec.group_size(k)), scale, zero, spec)
    return codes.reshape(n, -1)[:, :k].to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W_hat [N, K] from unpacked codes and per-group scale/zero [N, G], in scale's dtype."""
    n, k = codes.shape
    wg = (_grouped(codes.to(scale.dtype), spec.group_size(k)) - zero[..., None]) * scale[..., None]
    return wg.reshape(n, -1)[:, :k].contiguous()


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> torch.Tensor:
    """RTN quantize-dequantize of W in W's dtype, passing gradients straight through (STE)."""
    with torch.no_grad():
        scale, zero = fit_groups(w.detach(), spec, clip_search, dtype=w.dtype)
        w_hat = dequantize_codes(quantize(w.detach(), scale, zero, spec), scale, zero, spec)
    return w + (w_hat - w).detach()


# -- packing and the reference op ----------------------------------------------------------------------
def packed(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> Packed:
    """The stored form of codes [N, K] with per-group scale and zero [N, G]."""
    info = {"bits": spec.bits, "group": spec.group, "sym": spec.sym}
    if spec.offset == "min":   # the fp16 minimum -zero * scale was (exactly: see _fit)
        zeros, info["offset"] = (-zero * scale).to(torch.float16), "min"
    else:
        zeros = None if spec.sym else pack(zero.to(torch.int32), spec.bits)
    return Packed(FORMAT, {"qweight": pack(codes, spec.bits), "scales": scale.to(torch.float16), "zeros": zeros},
                  (spec.bits, spec.group, codes.shape[1]), info)


def pack_weight(w: torch.Tensor, spec: QuantSpec, clip_search: bool = False) -> Packed:
    """Round-to-nearest."""
    w = w.to(torch.float64)   # once, for both
    scale, zero = fit_groups(w, spec, clip_search)
    return packed(quantize(w, scale, zero, spec), scale, zero, spec)


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group: int, in_features: int) -> torch.Tensor:
    """Reference dequantization of the packed layout above to a float32 [N, K] weight (a group at a
    time: [N, G, g] against scales [N, G, 1])."""
    n, k = qweight.shape[0], in_features
    codes = _grouped(unpack(qweight, bits, k, torch.float32), k if group == -1 else group)
    s = scales.to(torch.float32)[..., None]
    if zeros is not None and zeros.is_floating_point():   # offset "min": code * scale + minimum
        w = codes * s + zeros.to(torch.float32)[..., None]
    else:
        zero = float(1 << (bits - 1)) if zeros is None else unpack(zeros, bits, scales.shape[1], torch.float32)[..., None]
        w = (codes - zero) * s
    return w.reshape(n, -1)[:, :k].contiguous()


@dequantize.register_fake
def _(qweight, scales, zeros, bits, group, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


# -- MatMulNBits -------------------------------------------------------------------------------------------
def block_size_for(group: int, k: int) -> int | None:
    g = k if group == -1 else group
    b = g & -g   # largest power of two dividing g
    if b >= 16:
        return min(b, 256)
    if g >= k and k <= 256:   # one group per row: a single padded block holds it
        return max(16, 1 << (k - 1).bit_length())
    return None


def to_matmul_nbits(qweight, scales, zeros, bits: int, group: int, k: int):
    """lowbit packed weight -> (B, scales, zero_points or None, block_size) in MatMulNBits layout."""
    bs = block_size_for(group, k)
    if bs is None:
        raise ValueError(f"group {group} has no power-of-two block >= 16 that divides it")
    n = qweight.shape[0]
    g = k if group == -1 else group
    n_blocks = math.ceil(k / bs)
    codes = F.pad(unpack(qweight, bits, k), (0, n_blocks * bs - k))
    b = pack(codes, bits).reshape(n, n_blocks, bs * bits // 8)
    block_group = (torch.arange(n_blocks) * bs) // g            # the lowbit group each block is in
    s = scales.float()[:, block_group].reshape(-1)
    zp = None
    if zeros is not None and zeros.is_floating_point():   # offset "min": float zero points -min / scale
        zp = (-zeros.float() / scales.float())[:, block_group].reshape(-1)
    elif zeros is not None:
        zp = pack(unpack(zeros, bits, scales.shape[1])[:, block_group], bits).reshape(-1)
    return b, s, zp, bs


@torch.library.custom_op("lowbit::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, K: int, N: int, bits: int, block_size: int) -> torch.Tensor:
    """Reference MatMulNBits: x [..., K] @ dequantized B^T (+ bias) -> [..., N]."""
    n_blocks = b.shape[1]
    codes = unpack(b.reshape(N, -1), bits, n_blocks * block_size).float()
    s = scales.float().reshape(N, n_blocks)
    if zero_points is None:
        z = torch.full_like(s, float(1 << (bits - 1)))
    elif zero_points.is_floating_point():   # MatMulNBits' float zero points: one per block
        z = zero_points.float().reshape(N, n_blocks)
    else:
        z = unpack(zero_points.reshape(N, -1), bits, n_blocks).float()
    blk = torch.arange(n_blocks * block_size, device=b.device) // block_size
    w = ((codes - z[:, blk]) * s[:, blk])[:, :K]
    return F.linear(x, w.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)


# -- blocked DequantizeLinear ---------------------------------------------------------------------------------
@torch.library.custom_op("lowbit::dequantize_blocked", mutates_args=())
def dequantize_blocked(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                       block_size: int) -> torch.Tensor:
    """Reference DequantizeLinear(axis=0, block_size): -> W^T [K, N] float32."""
    blk = torch.arange(codes.shape[0]) // block_size
    z = zero_points[blk].float() if zero_points is not None else 0.0
    return (codes.float() - z) * scales.float()[blk]


@dequantize_blocked.register_fake
def _(codes, scales, zero_points, block_size):
    return codes.new_empty(codes.shape, dtype=torch.float32)


def to_dequantize_blocked(qweight, scales, zeros, bits: int, group: int, k: int):
    """lowbit packed weight -> (codes [K, N], scales [G, N], zero points [G, N] or None, block)."""
    codes = unpack(qweight, bits, k)
    if zeros is None:
        codes, zp = (codes - (1 << (bits - 1))).to(torch.int8), None
    else:
        codes, zp = codes.to(torch.uint8), unpack(zeros, bits, scales.shape[1]).to(torch.uint8).T.contiguous()
    return codes.T.contiguous(), scales.float().T.contiguous(), zp, (k if group == -1 else group)


# -- the format ----------------------------------------------------------------------------------------------
class Uniform(WeightFormat):
    name = "uniform"
    op = dequantize._opoverload

    def lower(self, ir, n, target: str) -> str:
        q, s, z = (ir.tensor(a.target) if a is not None else None for a in n.args[:3])
        bits, group, k = n.args[3:6]
        use = weight_of(n)
        base = base_name(n)
        fmin = z is not None and z.is_floating_point()
        if fmin and not (target == "onnx-ort" and use and bits in (2, 4, 8) and block_size_for(group, k)):
            raise LowbitError(f"node '{n.name}': weights with an fp16 group minimum (offset=min) lower to MatMulNBits "
                              f"(target onnx-ort, 2, 4 or 8 bits) only, not to {target} ({bits}-bit, group {group})")
        if target in ("onnx-ort", "cuda") and use and bits in (2, 4, 8) and block_size_for(group, k):
            lin, bias = use
            b, scales, zp, bs = to_matmul_nbits(q, s, z, bits, group, k)
            attrs = [ir.param(f"{base}.ort.{key}", t, n) if t is not None else None
                     for key, t in (("B", b), ("scales", scales), ("zero_points", zp))]
            ir.insert(matmul_nbits._opoverload, (lin.args[0], *attrs, bias, k, q.shape[0], bits, bs),
                      before=lin, replace=lin)
            return "matmul_nbits"
        codes, scales, zp, block = to_dequantize_blocked(q, s, z, bits, group, k)
        if bits <= 4:   # stored as ONNX 4-bit tensors on export
            four_bit(ir, f"{base}.qdq.codes", *([f"{base}.qdq.zero_points"] if zp is not None else []))
        attrs = [ir.param(f"{base}.qdq.{key}", t, n) if t is not None else None
                 for key, t in (("codes", codes), ("scales", scales), ("zero_points", zp))]
        aten = torch.ops.aten
        if use:
            lin, bias = use
            wt = ir.insert(dequantize_blocked._opoverload, (*attrs, block), before=lin, like=n)
            new = ir.insert(aten.matmul.default, (lin.args[0], wt), before=lin, replace=lin)
            plus_bias(ir, new, bias)
        else:
            wt = ir.insert(dequantize_blocked._opoverload, (*attrs, block), before=n, replace=n)
            ir.insert(aten.t.default, (wt,), after=wt, swap=(wt, None))
        return "dequantize_linear"

    def onnx(self, flavor: str, accuracy_level: int) -> dict:
        import onnxscript
        from onnxscript import opset23 as op
        _register_matmul_nbits_schema()
        msft = onnxscript.values.Opset("com.microsoft", 1)

        def matmul_nbits_onnx(x, b, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int):
            return msft.MatMulNBits(x, b, scales, zero_points, None, bias, K=K, N=N, bits=bits,
                                    block_size=block_size, accuracy_level=accuracy_level)

        def dequantize_blocked_onnx(codes, scales, zero_points, block_size: int):
            return op.DequantizeLinear(codes, scales, zero_points, axis=0, block_size=block_size)
        return {matmul_nbits._opoverload: matmul_nbits_onnx, dequantize_blocked._opoverload: dequantize_blocked_onnx}


@functools.cache
def _register_matmul_nbits_schema():
    """onnxscript needs an operator schema to emit a node; onnx ships none for onnxruntime's
    contrib ops, so MatMulNBits' (as onnxruntime documents it) is registered once."""
    from onnx import defs
    P, opt = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption.Optional
    A, INT = defs.OpSchema.Attribute, defs.OpSchema.AttrType.INT
    defs.register_schema(defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], ""),
                          ("T4", ["tensor(int32)"], "")],
        attributes=[A("K", INT, ""), A("N", INT, ""), A("bits", INT, ""), A("block_size", INT, ""),
                    A("accuracy_level", INT, "", required=False)]))


FORMAT = Uniform()
