"""Weight formats: how a quantized linear's weight is stored, and everything that reads it. Each
format is one module that owns its packed layout (documented at its top), its packing, the
reference op the graph calls, its lowering to each kernel target and its ONNX form:
- uniform: integer codes on a per-group affine grid (RTN, GPTQ, FineQuant);
- lut: codes into a per-row lookup table (SqueezeLLM);
- sparse: outliers in CSR added to a dense weight (dense-and-sparse).
A new format is a new module here, listed in FORMATS."""
from __future__ import annotations

from . import lut, sparse, uniform
from .base import Packed, WeightFormat, pack, unpack  # noqa: F401

FORMATS: tuple[WeightFormat, ...] = (uniform.FORMAT, lut.FORMAT, sparse.FORMAT)
BY_OP = {f.op: f for f in FORMATS}
DENSE_OPS = frozenset(f.op for f in FORMATS if not f.additive)      # make a weight from stored tensors
ADDITIVE_OPS = frozenset(f.op for f in FORMATS if f.additive)       # add stored tensors to a weight


def lower(ir, target: str, applies=lambda name: True) -> dict[str, int]:
    """Rewrite every weight-format op for a kernel target (additive formats first: they read the
    weight the others make), those `applies(node name)` allows; returns how many of each kind."""
    counts: dict[str, int] = {}
    for f in sorted(FORMATS, key=lambda f: not f.additive):
        for n in [n for n in ir.graph.nodes if n.target is f.op and applies(n.name)]:
            kind = f.lower(ir, n, target)
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def onnx_translations(flavor: str, accuracy_level: int) -> dict:
    """{kernel op: onnxscript function} of every format, for torch.onnx's custom translation table."""
    table = {}
    for f in FORMATS:
        table.update(f.onnx(flavor, accuracy_level))
    return table
