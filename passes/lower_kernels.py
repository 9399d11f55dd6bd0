"""`lower-kernels{target}`: quantized linears, lookup-table weights, sparse outliers become the
kernel ops their target runtime executes. Every kernel op has a CPU reference implementation
(ir/kernels.py), so a lowered graph still runs in the reference backend with the same numbers.

- onnx-ort: linear over a dequantized weight -> lowbit.matmul_nbits (com.microsoft::MatMulNBits).
- onnx-qdq: -> matmul over lowbit.dequantize_blocked (opset-21 DequantizeLinear, blocked int4/int8).
- trt: as onnx-qdq, but lookup-table linears -> lowbit.lut_matmul and sparse outliers ->
  lowbit.sparse_matmul added to the product: nodes in the `lowbit` ONNX domain for the plugins.
- cuda: the plugins' kernels in PyTorch (plugins/torch_ops.py): int4 linears as onnx-ort,
  lookup tables and outliers as trt.
- onnx-ort and onnx-qdq: lookup tables -> lowbit.gather_lut, outliers -> lowbit.scatter_add (standard
  GatherElements / ScatterElements), weights the ort target cannot hold as MatMulNBits -> onnx-qdq's form."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.ir import kernels, meta
from lowbit.ir.quant import csr_rows, dequantize, dequantize_lut, sparse_add, unpack

from .base import Exact, Pass, PassContext, PassResult, register

TARGETS = ("torch", "onnx-ort", "onnx-qdq", "trt", "cuda")
aten = torch.ops.aten


def _op(f):
    return f._opoverload


def _weight_of(n: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(linear, bias) when n's only use is as the weight of a linear."""
    if len(n.users) != 1:
        return None
    u = next(iter(n.users))
    if u.target is aten.linear.default and u.args[1] is n:
        return u, (u.args[2] if len(u.args) > 2 else None)
    return None


@register
class LowerKernels(Pass):
    """Replace quantized linears, lookup tables and sparse outliers by the kernel ops of a target runtime."""
    name = "lower-kernels"

    @dataclass(frozen=True)
    class Config:
        target: str = "onnx-ort"

        def __post_init__(self):
            if self.target not in TARGETS:
                raise ValueError(f"target '{self.target}' is not available (available: {', '.join(TARGETS)})")

    def contract(self):
        return Exact(1e-5)   # the same weights; only where the dequantization happens moves

    def run(self, ir, ctx: PassContext) -> PassResult:
        t = self.config.target
        if t == "torch":   # the reference form already is the torch form
            return PassResult(False)
        self.ir, counts = ir, {}
        g = ir.graph
        fused = t in ("trt", "cuda")   # LUT GEMM and sparse matvec kernels
        for n in [n for n in g.nodes if n.target is _op(sparse_add)]:
            counts["sparse"] = counts.get("sparse", 0) + self._sparse(n, fused)
        for n in [n for n in g.nodes if n.target is _op(dequantize_lut)]:
            counts["lut"] = counts.get("lut", 0) + self._lut(n, fused)
        for n in [n for n in g.nodes if n.target is _op(dequantize)]:
            kind = self._uniform(n, t)
            counts[kind] = counts.get(kind, 0) + 1
        if not counts:
            return PassResult(False)
        ir.remove_dead()
        ir.changed()
        return PassResult(True, counts)

    # -- helpers ---------------------------------------------------------------------------------
    def _attr(self, name: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        self.ir.set_tensor(name, value)
        return self.ir.get_attr(name, before=before)

    def _replace(self, old: fx.Node, target, args, like=None) -> fx.Node:
        with self.ir.graph.inserting_before(old):
            new = self.ir.graph.call_function(target, args)
        src = like or old
        new.meta.update({k: src.meta[k] for k in (meta.TYPE, meta.MODULE, meta.QUANT) if k in src.meta})
        self.ir.stamp(new, like=src)
        old.replace_all_uses_with(new)
        self.ir.graph.erase_node(old)
        return new

    def _plus_bias(self, node: fx.Node, bias):
        if bias is None:
            return node
        with self.ir.graph.inserting_after(node):
            add = self.ir.graph.call_function(aten.add.Tensor, (node, bias))
        node.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
        return self.ir.stamp(add)

    def _base(self, n: fx.Node) -> str:
        return n.args[0].target.rsplit(".", 1)[0]

    # -- rewrites ----------------------------------------------------------------------------------
    def _sparse(self, n, trt: bool) -> int:
        w, crow, col, val = n.args
        crow_t, col_t = self.ir.tensor(crow.target), self.ir.tensor(col.target)
        use = _weight_of(n)
        if trt and use:                       # y = x W^T + x S^T, S applied by the plugin
            lin, _ = use
            rows = len(crow_t) - 1   # CSR row pointers: one per output row, plus one
            n.replace_all_uses_with(w)
            self.ir.graph.erase_node(n)
            with self.ir.graph.inserting_before(lin.next):
                sp = self.ir.graph.call_function(_op(kernels.sparse_matmul), (lin.args[0], crow, col, val, rows))
                add = self.ir.graph.call_function(aten.add.Tensor, (lin, sp))
            lin.replace_all_uses_with(add, delete_user_cb=lambda u: u is not add)
            self.ir.stamp(sp)
            self.ir.stamp(add)
            return 1
        k = self.ir.constant(w).shape[1]
        flat = (csr_rows(crow_t) * k + col_t.long()).to(torch.int32)
        idx = self._attr(crow.target.rsplit(".", 1)[0] + ".flat_index", flat, n)
        self._replace(n, _op(kernels.scatter_add), (w, idx, val))
        return 1

    def _lut(self, n, trt: bool) -> int:
        q, lut, bits, k = n.args
        use = _weight_of(n)
        if trt and use:
            lin, bias = use
            new = self._replace(lin, _op(kernels.lut_matmul), (lin.args[0], q, lut, bits, k), like=lin)
            self._plus_bias(new, bias)
            return 1
        codes = unpack(self.ir.tensor(q.target), bits, k).to(torch.uint8)
        if bits <= 4:   # stored as an ONNX 4-bit tensor on export
            self.ir.scratch.setdefault("onnx_4bit", set()).add(self._base(n) + ".codes")
        self._replace(n, _op(kernels.gather_lut), (self._attr(self._base(n) + ".codes", codes, n), lut))
        return 1

    def _uniform(self, n, target: str) -> str:
        q, s, z = (self.ir.tensor(a.target) if a is not None else None for a in n.args[:3])
        bits, group, k = n.args[3:6]
        use = _weight_of(n)
        base = self._base(n)
        if target in ("onnx-ort", "cuda") and use and bits in (2, 4, 8) and kernels.block_size_for(group, k):
            lin, bias = use
            b, scales, zp, bs = kernels.to_matmul_nbits(q, s, z, bits, group, k)
            attrs = [self._attr(f"{base}.ort.{key}", t, n) if t is not None else None
                     for key, t in (("B", b), ("scales", scales), ("zero_points", zp))]
            self._replace(lin, _op(kernels.matmul_nbits), (lin.args[0], *attrs, bias, k, q.shape[0], bits, bs), like=lin)
            return "matmul_nbits"
        codes, scales, zp, block = kernels.to_dequantize_blocked(q, s, z, bits, group, k)
        if bits <= 4:   # stored as ONNX 4-bit tensors on export
            self.ir.scratch.setdefault("onnx_4bit", set()).update(
                {f"{base}.qdq.codes"} | ({f"{base}.qdq.zero_points"} if zp is not None else set()))
        attrs = [self._attr(f"{base}.qdq.{key}", t, n) if t is not None else None
                 for key, t in (("codes", codes), ("scales", scales), ("zero_points", zp))]
        if use:
            lin, bias = use
            with self.ir.graph.inserting_before(lin):
                wt = self.ir.graph.call_function(_op(kernels.dequantize_blocked), (*attrs, block))
            self.ir.stamp(wt, like=n)
            new = self._replace(lin, aten.matmul.default, (lin.args[0], wt), like=lin)
            self._plus_bias(new, bias)
        else:
            wt = self._replace(n, _op(kernels.dequantize_blocked), (*attrs, block))
            with self.ir.graph.inserting_after(wt):
                tr = self.ir.graph.call_function(aten.t.default, (wt,))
            wt.replace_all_uses_with(tr, delete_user_cb=lambda u: u is not tr)
            self.ir.stamp(tr)
        return "dequantize_linear"
