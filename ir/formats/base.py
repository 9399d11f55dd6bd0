"""What every weight format shares: the code bit streams, the packed weight, the interface a
format implements, and the small graph helpers their lowerings use.

Code streams (uniform and lookup-table weights): `qweight` uint8 [N, ceil(K*bits/8)], each row a
little-endian bit stream of K unsigned codes of `bits` bits; code k occupies bits
[k*bits, (k+1)*bits) of its row, so for 4 bits code 2j is the low nibble of byte j (the
MatMulNBits order)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import torch.fx as fx

aten = torch.ops.aten


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes in [0, 2**bits) -> uint8 [N, ceil(K*bits/8)] little-endian bit rows."""
    n, k = codes.shape
    if 8 % bits == 0:   # whole codes per byte: OR them in, in bytes
        per = 8 // bits
        c = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-k) % per)).reshape(n, -1, per)
        out = c[..., 0].clone()
        for j in range(1, per):
            out |= c[..., j] << (j * bits)
        return out
    c = codes.to(torch.int32)
    stream = ((c[..., None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(n, k * bits)
    stream = torch.nn.functional.pad(stream, (0, (-k * bits) % 8)).reshape(n, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int, dtype=torch.int32) -> torch.Tensor:
    """Inverse of `pack`: uint8 rows -> [N, K] codes in `dtype`."""
    n = packed.shape[0]
    if 8 % bits == 0:   # shifted and masked in bytes
        per = 8 // bits
        c = (packed[..., None] >> (torch.arange(per, dtype=torch.uint8, device=packed.device) * bits)) & ((1 << bits) - 1)
        return c.reshape(n, -1)[:, :k].to(dtype)
    p = packed.to(torch.int32)
    stream = ((p[..., None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1).reshape(n, -1)
    stream = stream[:, : k * bits].reshape(n, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(dtype)


class WeightFormat:
    """One way of storing a linear's weight. A format owns its layout and packing (its module),
    the reference op the graph calls, `lower` (the rewrite for each kernel target) and `onnx`
    (the ONNX form of the ops its lowering emits)."""
    name: ClassVar[str]
    op: ClassVar           # reference op: (stored tensors..., constants) -> float32 W [N, K]
    additive: ClassVar[bool] = False   # adds to the weight in its first argument instead of making one

    def lower(self, ir, node: fx.Node, target: str) -> str:
        """Rewrite `node` (a call of `op`) for a kernel target; returns what it became, for stats."""
        raise NotImplementedError

    def onnx(self, flavor: str, accuracy_level: int) -> dict:
        """{kernel op: onnxscript function} for the ops `lower` emits."""
        return {}


@dataclass
class Packed:
    """One quantized weight as stored: the tensors its format's op reads (in argument order; None
    for an absent optional one), the op's constant arguments, and what `lowbit inspect` reports."""
    format: WeightFormat
    tensors: dict[str, torch.Tensor | None]
    consts: tuple
    info: dict = field(default_factory=dict)

    def w_hat(self) -> torch.Tensor:
        return self.format.op(*self.tensors.values(), *self.consts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)


# -- helpers the lowerings share -------------------------------------------------------------------
def weight_of(n: fx.Node) -> tuple[fx.Node, fx.Node | None] | None:
    """(linear, bias) when n's only use is as the weight of a linear."""
    if len(n.users) != 1:
        return None
    u = next(iter(n.users))
    if u.target is aten.linear.default and u.args[1] is n:
        return u, (u.args[2] if len(u.args) > 2 else None)
    return None


def plus_bias(ir, node: fx.Node, bias) -> fx.Node:
    """node + bias after node, read by node's users; node itself when there is no bias."""
    return node if bias is None else ir.insert(aten.add.Tensor, (node, bias), after=node, swap=(node, None))


def base_name(n: fx.Node) -> str:
    """Where a packed weight's tensors live: its first stored tensor's path, last part dropped."""
    return n.args[0].target.rsplit(".", 1)[0]


def four_bit(ir, *names: str):
    """Mark initializers the ONNX export stores as 4-bit tensors (two codes per byte)."""
    ir.scratch.setdefault("onnx_4bit", set()).update(names)


def onnx_const(a):
    import onnx_ir
    from onnxscript import opset23 as op
    return op.Constant(value=onnx_ir.tensor(np.asarray(a)))


FLOATS = ("tensor(float)", "tensor(float16)")


@functools.cache
def register_lowbit_schema(name: str, inputs: tuple, attrs: tuple = ()):
    """Register a node of the `lowbit` ONNX domain (flavor trt: what the CUDA plugins implement)
    with onnx, so onnxscript can emit it and onnx.checker accepts it. inputs: (name, type
    constraint, allowed types) triples; the output Y has the first input's type; attrs: INT
    attribute names."""
    from onnx import defs
    P, A, INT = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute, defs.OpSchema.AttrType.INT
    cons = list({c: (c, list(types), "") for _, c, types in inputs}.values())
    defs.register_schema(defs.OpSchema(name, "lowbit", 1, inputs=[P(n, c) for n, c, _ in inputs],
                                       outputs=[P("Y", inputs[0][1])], type_constraints=cons,
                                       attributes=[A(a, INT, "") for a in attrs]))
