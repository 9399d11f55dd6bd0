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
    blk = torch.arange(n_blocks * block_size) // block_size
    w = ((codes - z[:, blk]) * s[:, blk])[:, :K]
    return F.linear(x, w.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, K, N, bits, block_size):
    return x.new_empty(*x.shape[:-1], N)
