"""lower-kernels: each weight format's rewrite for each kernel target keeps the numbers."""
import pytest
import torch

from lowbit.passes import PassContext, PassManager
from models import tiny_ir

L = torch.ops.lowbit


@pytest.mark.parametrize("target", ["onnx-ort", "onnx-qdq", "trt"])
@pytest.mark.parametrize("quant", ["bits=4,group=32,sym=false", "bits=4,group=16,sym=true", "bits=4,group=-1,sym=true",
                                   "bits=8,group=48,sym=false", "bits=3,group=32,sym=false"])
def test_lowering_keeps_the_numbers(target, quant):
    ir, _ = tiny_ir("qwen2")   # with q/k/v biases
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    PassManager(f"quantize-weights{{{quant}}}").run(ir)
    ref = ir(x)
    res = PassManager(f"lower-kernels{{target={target}}}").run(ir)[0]
    assert res.modified and not any(n.target is L.dequantize.default for n in ir.graph.nodes)
    kernel = L.matmul_nbits.default if target == "onnx-ort" and "bits=3" not in quant else L.dequantize_blocked.default
    assert sum(n.target is kernel for n in ir.graph.nodes) == 14   # 3 bits: MatMulNBits cannot, DequantizeLinear can
    assert (ir(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not PassManager(f"lower-kernels{{target={target}}}").run(ir)[0].modified


def test_group_minimum_lowers_to_matmul_nbits_only():
    """offset=min weights: MatMulNBits with float zero points (-min / scale) for onnx-ort, refused
    by node elsewhere (DequantizeLinear and the CUDA kernels take integer zero points)."""
    from lowbit.passes.pipeline import PipelineError
    ir, _ = tiny_ir("llama")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    PassManager("quantize-weights{bits=4,group=32,sym=false,offset=min}").run(ir)
    ref = ir(x)
    for target in ("onnx-qdq", "cuda"):
        with pytest.raises(PipelineError, match=f"node '\\w+'.*offset=min.*not to {target}"):
            PassManager(f"lower-kernels{{target={target}}}").run(ir.fork())
    PassManager("lower-kernels{target=onnx-ort}").run(ir)
    assert sum(n.target is L.matmul_nbits.default for n in ir.graph.nodes) == 14
    assert (ir(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("target,kinds", [("onnx-qdq", {L.gather_lut.default, L.scatter_add.default}),
                                          ("trt", {L.lut_matmul.default, L.sparse_matmul.default})])
def test_lookup_tables_and_outliers_lower_for_each_target(target, kinds):
    ir, _ = tiny_ir("llama")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))   # for the Fisher information
    PassManager("split-outliers{sensitive=0},quantize-weights{method=squeezellm,bits=3,samples=2}").run(
        ir, PassContext(calib=calib))
    ref = ir(x)
    res = PassManager(f"lower-kernels{{target={target}}}").run(ir)[0]
    assert res.stats == {"sparse": 14, "lut": 14}
    found = {n.target for n in ir.graph.nodes if n.op == "call_function"}
    assert kinds <= found and not found & {L.dequantize_lut.default, L.sparse_add.default}
    assert (ir(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_torch_target_changes_nothing():
    ir, _ = tiny_ir("llama")
    PassManager("quantize-weights").run(ir)
    before = [n.target for n in ir.graph.nodes]
    assert not PassManager("lower-kernels{target=torch}").run(ir)[0].modified
    assert [n.target for n in ir.graph.nodes] == before


def test_before_expected():
    """target=onnx-ort: each int4 linear becomes one lowbit.matmul_nbits over MatMulNBits' layout."""
    import torch.nn.functional as F

    from graphs import NAMES, Tiny, assert_matches, ir_of, weights
    from lowbit.ir.formats.uniform import QuantSpec, matmul_nbits, pack_weight, to_matmul_nbits
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("quantize-weights{method=rtn,bits=4,group=16,sym=false},lower-kernels{target=onnx-ort}").run(ir)

    def mm(name, x, m):
        if name == "lm_head":
            return F.linear(x, m.lin[name])
        n, k = w[name].shape
        return matmul_nbits(x, *(getattr(m, f"{name}_{t}") for t in ("B", "scales", "zero_points")), None, k, n, 4,
                            getattr(m, f"{name}_block"))
    expected = Tiny(w, matmul=mm)
    for name in NAMES[:-1]:
        t = pack_weight(w[name], QuantSpec(4, 16, False)).tensors
        b, s, z, bs = to_matmul_nbits(t["qweight"], t["scales"], t["zeros"], 4, 16, w[name].shape[1])
        for key, v in (("B", b), ("scales", s), ("zero_points", z)):
            expected.register_buffer(f"{name}_{key}", v)
        setattr(expected, f"{name}_block", bs)
    assert_matches(ir, ir_of(expected))
