"""The structural analysis: what it finds from the graph, and refusals that name the node."""
import pytest
import torch

from lowbit.ir.errors import StructureError
from models import tiny_ir

aten = torch.ops.aten



def test_quantized_and_split_linears_are_found_through_their_formats():
    """A linear stays a linear whatever format stores its weight: the analysis reads the format
    registry (ir/formats), so sizes, bias and module survive quantization and outlier splitting."""
    from lowbit.passes import PassManager
    ir, _ = tiny_ir("llama")
    before = {n: (lin.in_features, lin.out_features, lin.module, lin.bias) for n, lin in ir.analysis.linears.items()}
    PassManager("split-outliers{sensitive=0},quantize-weights{method=rtn,bits=4,group=32}").run(ir)
    s = ir.analysis
    after = {n: (lin.in_features, lin.out_features, lin.module, lin.bias) for n, lin in s.linears.items()}
    assert after == before
    assert all(lin.quantized and lin.sparse for lin in s.linears.values() if lin is not s.lm_head)
    assert not s.lm_head.quantized and s.lm_head.sparse is None   # both passes leave lm_head by default
    assert len(s.blocks) == 4 and s.summary()["layers"] == 2


def test_unknown_structure_names_node():
    ir, _ = tiny_ir("llama")
    # an rsqrt that is not an RMSNorm: rsqrt(mean) without the eps add
    add = next(n for n in ir.graph.nodes if n.target is aten.rsqrt.default).args[0]
    rs = next(iter(add.users))
    rs.args = (add.args[0],)
    ir.changed()
    with pytest.raises(StructureError, match=rf"node '{rs.name}'.*rsqrt\(mean\(x\^2\) \+ eps\)"):
        ir.analysis


def test_linear_weight_not_parameter_names_node():
    ir, _ = tiny_ir("llama")
    lin = next(n for n in ir.graph.nodes if n.target is aten.linear.default)
    with ir.graph.inserting_before(lin):
        neg = ir.graph.call_function(aten.neg.default, (lin.args[1],))
    lin.replace_input_with(lin.args[1], neg)
    ir.changed()
    with pytest.raises(StructureError, match=rf"node '{lin.name}'.*weight is a parameter"):
        ir.analysis
