"""Lookup-table weights (SqueezeLLM's non-uniform format).

Layout: `qweight` uint8 [N, ceil(K*bits/8)], the code streams of formats/base.py; `lut` float16
[N, 2**bits], the values of each output row's codes. W_hat[n, k] = lut[n, code[n, k]]
(op `lowbit.dequantize_lut`).

Lowered: targets trt and cuda -> `lowbit.lut_matmul` (x @ W^T over this layout, the plugins'
fused kernel; the `lowbit.LutMatMul` ONNX node); other targets -> `lowbit.gather_lut` over
unpacked uint8 codes [N, K] (GatherElements; codes stored as ONNX UINT4 up to 4 bits)."""
from __future__ import annotations

import torch

from .base import FLOATS, Packed, WeightFormat, base_name, four_bit, pack, plus_bias, register_lowbit_schema, unpack, weight_of


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


def packed(codes: torch.Tensor, lut: torch.Tensor, bits: int) -> Packed:
    """The stored form of codes [N, K] into per-row tables lut [N, 2**bits]."""
    return Packed(FORMAT, {"qweight": pack(codes, bits), "lut": lut.to(torch.float16)}, (bits, codes.shape[1]),
                  {"bits": bits, "group": -1, "sym": False, "lut": 1 << bits})


@torch.library.custom_op("lowbit::dequantize_lut", mutates_args=())
def dequantize_lut(qweight: torch.Tensor, lut: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Reference dequantization of the lookup-table layout to a float32 [N, K] weight."""
    codes = unpack(qweight, bits, in_features, torch.int64)
    return torch.gather(lut.to(torch.float32), 1, codes)


@dequantize_lut.register_fake
def _(qweight, lut, bits, in_features):
    return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


@torch.library.custom_op("lowbit::gather_lut", mutates_args=())
def gather_lut(codes: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """W[n, k] = lut[n, codes[n, k]] (GatherElements): a lookup-table weight in standard ops."""
    return torch.gather(lut.float(), 1, codes.long())


@gather_lut.register_fake
def _(codes, lut):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("lowbit::lut_matmul", mutates_args=())
def lut_matmul(x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """x @ W^T for a lookup-table weight in the layout above."""
    return torch.nn.functional.linear(x, dequantize_lut(qweight, lut, bits, K).to(x.dtype))


@lut_matmul.register_fake
def _(x, qweight, lut, bits, K):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


class LookupTable(WeightFormat):
    name = "lut"
    op = dequantize_lut._opoverload

    def lower(self, ir, n, target: str) -> str:
        q, lut, bits, k = n.args
        use = weight_of(n)
        if target in ("trt", "cuda") and use:
            lin, bias = use
            new = ir.insert(lut_matmul._opoverload, (lin.args[0], q, lut, bits, k), before=lin, replace=lin)
            plus_bias(ir, new, bias)
            return "lut"
        codes = unpack(ir.tensor(q.target), bits, k).to(torch.uint8)
        if bits <= 4:   # stored as an ONNX 4-bit tensor on export
            four_bit(ir, base_name(n) + ".codes")
        ir.insert(gather_lut._opoverload, (ir.param(base_name(n) + ".codes", codes, n), lut), before=n, replace=n)
        return "lut"

    def onnx(self, flavor: str, accuracy_level: int) -> dict:
        import onnxscript
        from onnxscript import opset23 as op

        def gather_lut_onnx(codes, lut):
            return op.GatherElements(op.Cast(lut, to=1), op.Cast(codes, to=7), axis=1)
        table = {gather_lut._opoverload: gather_lut_onnx}
        if flavor == "trt":
            register_lowbit_schema("LutMatMul", (("X", "T", FLOATS), ("qweight", "U", ("tensor(uint8)",)),
                                                 ("lut", "L", FLOATS)), ("bits", "K"))
            lb = onnxscript.values.Opset("lowbit", 1)
            table[lut_matmul._opoverload] = lambda x, q, lut, bits, K: lb.LutMatMul(x, q, lut, bits=bits, K=K)
        return table


FORMAT = LookupTable()
