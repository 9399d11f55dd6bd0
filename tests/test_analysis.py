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


def _heads(start, stride, n, hd=16):   # rows start + i * stride + [0, hd) for i < n
    return [start + i * stride + j for i in range(n) for j in range(hd)]


@pytest.mark.parametrize("family,expect", [
    ("gpt2", dict(heads=4, kv_heads=4, fused_qkv=True, activation="elementwise", v_rows=list(range(128, 192)),
                  positions=True)),
    ("opt", dict(heads=4, kv_heads=4, fused_qkv=False, activation="relu", v_rows=list(range(64)), positions=True)),
    ("stablelm", dict(heads=4, kv_heads=2, fused_qkv=False, activation="silu", v_rows=list(range(32)),
                      positions=False)),
    ("gemma3_text", dict(heads=4, kv_heads=2, fused_qkv=False, activation="gelu", v_rows=list(range(32)),
                         positions=False)),
    # q/k/v interleaved per head: GPT-NeoX [head][q|k|v], Falcon [kv group][q q|k|v]
    ("gpt_neox", dict(heads=4, kv_heads=4, fused_qkv=True, activation="gelu", v_rows=_heads(32, 48, 4),
                      positions=False)),
    ("falcon", dict(heads=4, kv_heads=2, fused_qkv=True, activation="gelu", v_rows=_heads(48, 64, 2),
                    positions=False)),
])
def test_structure_of_more_families(family, expect):
    """LayerNorm blocks, learned positions added to the token embedding (found as such, not as a
    residual add), GPT-2's spelled-out GELU and its q/k/v split, OPT's stream regrouped into rows,
    q/k/v interleaved per head (GPT-NeoX, Falcon) and their parallel blocks."""
    ir, _ = tiny_ir(family)
    s = ir.analysis
    summ = s.summary()
    assert {k: summ[k] for k in ("heads", "kv_heads", "fused_qkv", "activation")} == \
        {k: expect[k] for k in ("heads", "kv_heads", "fused_qkv", "activation")}
    assert summ["layers"] == 2 and len(s.blocks) == 4 and s.attentions[0].v_rows.tolist() == expect["v_rows"]
    assert (s.positions is not None) == expect["positions"]
    assert s.lm_head.module == "lm_head" and all(b.norm.consumers for b in s.blocks)


def test_parallel_blocks_share_the_residual_add():
    """x + attn(ln(x)) + mlp(ln(x)) (Phi): two blocks on one residual add, reading one shared norm."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.ir.capture import capture
    from lowbit.ir.graph import ModelInfo
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("phi", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    ir = capture(AutoModelForCausalLM.from_config(cfg).eval(), ModelInfo("phi", 256, 128, "phi", ""))
    s = ir.analysis
    assert [("attn" if b.attention else "mlp") for b in s.blocks] == ["attn", "mlp", "attn", "mlp"]
    assert s.blocks[0].add is s.blocks[1].add and s.blocks[0].norm is s.blocks[1].norm
    assert s.summary()["residual_adds"] == 2 and s.summary()["layers"] == 2
    assert [lin.name.rsplit(".", 1)[-1] for lin in s.blocks[1].norm.consumers] == ["q_proj", "k_proj", "v_proj", "fc1"]
    assert s.mlps[0].up.name.endswith("fc1") and s.mlps[0].gate is None


def test_post_norms_and_blocks_without_pre_norm():
    """Gemma3: a norm before and after each branch; OLMo2: after only, its linears reading the
    stream itself (a pre-norm of kind "none")."""
    for family, pre in (("gemma3_text", "rms"), ("olmo2", "none")):
        s = tiny_ir(family)[0].analysis
        assert len(s.blocks) == 4 and all(b.norm.kind == pre and b.post_norm is not None for b in s.blocks)
        writers = [b.attention.o if b.attention else b.mlp.down for b in s.blocks]
        assert all(b.post_norm.input is w.node and b.post_norm.output in b.add.args for b, w in zip(s.blocks, writers))
    assert [lin.name.rsplit(".", 1)[-1] for lin in s.blocks[0].norm.consumers] == ["q_proj", "k_proj", "v_proj"]


def test_mixture_of_experts_blocks():
    """Mixtral: the router is the one plain linear reading the MLP's pre-norm (through a view), the
    experts' stacks read it through the token gather; the stack writing the stream's width is down."""
    s = tiny_ir("mixtral")[0].analysis
    assert len(s.mlps) == 2
    for m in s.mlps:
        assert m.router.experts == 0 and m.router.out_features == 4
        assert m.fused_gate_up and (m.up.experts, m.up.out_features, m.up.in_features) == (4, 192, 64)
        assert (m.down.experts, m.down.out_features, m.down.in_features) == (4, 64, 96) and m.act == "silu"
    b = next(b for b in s.blocks if b.mlp)
    assert {lin.name for lin in b.norm.consumers} == {b.mlp.router.name, b.mlp.up.name} and not b.norm.other_users


