"""`lower-kernels{target}`: quantized linears, lookup-table weights and sparse outliers become the
kernel ops their target runtime executes; each weight format (ir/formats) says how for its own
ops. Every kernel op has a CPU reference implementation, so a lowered graph still runs in the
reference backend with the same numbers.

- onnx-ort: uniform int2/4/8 linears -> lowbit.matmul_nbits (com.microsoft::MatMulNBits).
- onnx-qdq: -> matmul over lowbit.dequantize_blocked (opset-21 DequantizeLinear, blocked int4/int8).
- trt: as onnx-qdq, but lookup-table linears -> lowbit.lut_matmul and sparse outliers ->
  lowbit.sparse_matmul added to the product: nodes in the `lowbit` ONNX domain for the plugins.
- cuda: the plugins' kernels in PyTorch (plugins/torch_ops.py): int4 linears as onnx-ort,
  lookup tables and outliers as trt.
- onnx-ort and onnx-qdq: lookup tables -> lowbit.gather_lut, outliers -> lowbit.scatter_add (standard
  GatherElements / ScatterElements), weights the ort target cannot hold as MatMulNBits -> onnx-qdq's form."""
from __future__ import annotations

from dataclasses import dataclass

from lowbit.ir import formats

from .base import Exact, Pass, PassContext, PassResult, register

TARGETS = ("torch", "onnx-ort", "onnx-qdq", "trt", "cuda")


@register
class LowerKernels(Pass):
    """Replace quantized linears, lookup tables and sparse outliers by the kernel ops of a target runtime."""
    name = "lower-kernels"
    applications = "each weight-format node, by its node name"
    after = ("fold-norms", "learn-rotations", "fuse-rotations", "insert-hadamard", "split-outliers",
             "quantize-weights", "quantize-activations", "quantize-kv", "scale-channels", "shape-noise")

    @dataclass(frozen=True)
    class Config:
        target: str = "onnx-ort"

        def __post_init__(self):
            if self.target not in TARGETS:
                raise ValueError(f"target '{self.target}' is not available (available: {', '.join(TARGETS)})")

    def contract(self):
        return Exact(1e-5)   # the same weights; only where the dequantization happens moves

    def run(self, ir, ctx: PassContext) -> PassResult:
        if self.config.target == "torch":   # the reference form already is the torch form
            return PassResult(False)
        counts = formats.lower(ir, self.config.target, ctx.applies)
        if not counts:
            return PassResult(False)
        ir.remove_dead()
        ir.changed()
        return PassResult(True, counts)
