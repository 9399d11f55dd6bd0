"""Sparse outliers (dense-and-sparse): a CSR matrix added to a dense weight, W = D + S.

Layout: CSR of an [N, K] matrix: `crow` int32 [N+1], `col` int32 [nnz], `val` float16 [nnz];
op `lowbit.sparse_add(D, crow, col, val)` returns D + S, D being any weight (a parameter, or a
dequantized uniform or lookup-table weight).

Lowered: targets trt and cuda -> the dense product plus `lowbit.sparse_matmul` (x @ S^T, the
plugins' kernel; the `lowbit.SparseMatMul` ONNX node); other targets -> `lowbit.scatter_add` of
`val` at flat int32 positions row * K + col (ScatterElements with reduction add)."""
from __future__ import annotations

import numpy as np
import torch

from .base import FLOATS, WeightFormat, onnx_const, register_lowbit_schema, weight_of


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


@torch.library.custom_op("lowbit::scatter_add", mutates_args=())
def scatter_add(w: torch.Tensor, index: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """W with `val` added at flat positions `index` (int32; ScatterElements with reduction add):
    sparse outliers in standard ops."""
    return w.flatten().index_add(0, index.long(), val.to(w.dtype)).view_as(w)


@scatter_add.register_fake
def _(w, index, val):
    return torch.empty_like(w)


@torch.library.custom_op("lowbit::sparse_matmul", mutates_args=())
def sparse_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, N: int) -> torch.Tensor:
    """x @ S^T for a CSR matrix S with N rows (the outliers of a dense-and-sparse weight)."""
    s = torch.zeros(N, x.shape[-1], dtype=x.dtype)
    s[csr_rows(crow), col.long()] = val.to(x.dtype)
    return torch.nn.functional.linear(x, s)


@sparse_matmul.register_fake
def _(x, crow, col, val, N):
    return x.new_empty(*x.shape[:-1], N)


class SparseOutliers(WeightFormat):
    name = "sparse"
    op = sparse_add._opoverload
    additive = True

    def lower(self, ir, n, target: str) -> str:
        w, crow, col, val = n.args
        crow_t, col_t = ir.tensor(crow.target), ir.tensor(col.target)
        use = weight_of(n)
        if target in ("trt", "cuda") and use:     # y = x W^T + x S^T, S applied by the plugin
            lin, _ = use
            n.replace_all_uses_with(w)
            ir.graph.erase_node(n)
            sp = ir.insert(sparse_matmul._opoverload, (lin.args[0], crow, col, val, len(crow_t) - 1), before=lin.next)
            ir.insert(torch.ops.aten.add.Tensor, (lin, sp), after=sp, swap=(lin, None))
            return "sparse"
        k = ir.constant(w).shape[1]
        flat = (csr_rows(crow_t) * k + col_t.long()).to(torch.int32)
        idx = ir.param(crow.target.rsplit(".", 1)[0] + ".flat_index", flat, n)
        ir.insert(scatter_add._opoverload, (w, idx, val), before=n, replace=n)
        return "sparse"

    def onnx(self, flavor: str, accuracy_level: int) -> dict:
        import onnxscript
        from onnxscript import opset23 as op

        def scatter_add_onnx(w, index, val):
            flat = op.Reshape(w, onnx_const(np.array([-1], np.int64)))
            out = op.ScatterElements(flat, op.Cast(index, to=7), op.Cast(val, to=1), axis=0, reduction="add")
            return op.Reshape(out, op.Shape(w))
        table = {scatter_add._opoverload: scatter_add_onnx}
        if flavor == "trt":
            register_lowbit_schema("SparseMatMul", (("X", "T", FLOATS), ("crow", "I", ("tensor(int32)",)),
                                                    ("col", "I", ("tensor(int32)",)), ("val", "V", FLOATS)), ("N",))
            lb = onnxscript.values.Opset("lowbit", 1)
            table[sparse_matmul._opoverload] = lambda x, crow, col, val, N: lb.SparseMatMul(x, crow, col, val, N=N)
        return table


FORMAT = SparseOutliers()
