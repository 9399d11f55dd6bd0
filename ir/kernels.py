"""Kernel ops that `lower-kernels` puts in the graph: one op per quantized linear, taking the
activations and the weight in the layout its target runtime reads. Each has a CPU reference
implementation, so a lowered graph still runs in the reference backend.

MatMulNBits layout (onnxruntime's `com.microsoft::MatMulNBits`, what `target=onnx-ort` writes):
- `B` uint8 [N, n_blocks, block_size * bits / 8]: per output row, codes in blocks of `block_size`
  along K, packed like lowbit's bit streams (for 4 bits, code 2j in the low nibble of byte j);
  K is padded up to n_blocks * block_size (padding codes are never read).
- `scales` [N * n_blocks] in the activation dtype, row-major.
- `zero_points` uint8 [N * ceil(n_blocks * bits / 8)]: each row's block zero points packed the
  same way; absent for symmetric weights, where the zero point is 2^(bits-1) (as in lowbit).
- block_size is a power of two >= 16: a lowbit group that is not one (per-channel, or 96) is
  written as blocks of its largest power-of-two divisor with the group's scale repeated, which
  is exact; a per-channel row of K <= 256 without such a divisor (K = 172) is one padded block."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import pack, unpack


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
    codes = unpack(qweight, bits, k)
    codes = F.pad(codes, (0, n_blocks * bs - k))
    b = pack(codes, bits).reshape(n, n_blocks, bs * bits // 8)
    block_group = (torch.arange(n_blocks) * bs) // g            # the lowbit group each block is in
    s = scales.float()[:, block_group].reshape(-1)
    zp = None
    if zeros is not None:
        z = unpack(zeros, bits, scales.shape[1])[:, block_group]
        zp = pack(z, bits).reshape(-1)
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
    else:
        z = unpack(zero_points.reshape(N, -1), bits, n_blocks).float()
    blk = torch.arange(n_blocks * block_size, device=b.device) // block_size
    w = ((codes - z[:, blk]) * s[:, blk])[:, :K]
    return F.linear(x, w.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)


# -- standard-ONNX forms (target onnx-qdq): weights that DequantizeLinear and Gather ops read -------
# DequantizeLinear layout (opset 21, blocked, what TensorRT and onnxruntime's QDQ fusion read):
# codes [K, N] (the transposed weight; int8 holding signed codes code - 2^(bits-1) for symmetric
# weights, uint8 with zero points otherwise), scales float32 [ceil(K / block), N], zero points
# uint8 [ceil(K / block), N]; the export stores 2- to 4-bit codes and zero points as ONNX INT4/UINT4.
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


@torch.library.custom_op("lowbit::gather_lut", mutates_args=())
def gather_lut(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """W[n, k] = lut[n, codes[n, k]] (GatherElements): a lookup-table weight in standard ops."""
    return torch.gather(lut.float(), 1, codes.long())


@gather_lut.register_fake
def _(codes, lut):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("lowbit::scatter_add", mutates_args=())
def scatter_add(w: torch.Tensor, index: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """W with `val` added at flat positions `index` (int32; ScatterElements with reduction add):
    sparse outliers in standard ops."""
    return w.flatten().index_add(0, index.long(), val.to(w.dtype)).view_as(w)


@scatter_add.register_fake
def _(w, index, val):
    return torch.empty_like(w)


# -- lowbit-domain forms (target trt): what the CUDA plugins implement ----------------------------
@torch.library.custom_op("lowbit::lut_matmul", mutates_args=())
def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """x @ W^T for a lookup-table weight in lowbit's packed layout (quant.dequantize_lut)."""
    from .quant import dequantize_lut
    return torch.nn.functional.linear(x, dequantize_lut(qweight, lut, bits, K).to(x.dtype))


@lut_matmul.register_fake
def _(x, qweight, lut, bits, K):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("lowbit::sparse_matmul", mutates_args=())
def sparse_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, N: int) -> torch.Tensor:
    """x @ S^T for a CSR matrix S with N rows (the outliers of a dense-and-sparse weight)."""
    from .quant import csr_rows
    s = torch.zeros(N, x.shape[-1], dtype=x.dtype)
    s[csr_rows(crow), col.long()] = val.to(x.dtype)
    return torch.nn.functional.linear(x, s)


@sparse_matmul.register_fake
def _(x, crow, col, val, N):
    return x.new_empty(*x.shape[:-1], N)
