"""Capture is exact (captured vs eager logits within 1e-5) and the analysis finds the structure."""
import pytest
import torch

from lowbit.ir import meta
from models import FAMILIES, MORE_FAMILIES, tiny_ir

aten = torch.ops.aten

EXPECT = {  # family: (fused_qkv, qk_norm, fused_gate_up, tied, activation, q bias)
    "llama": (False, False, False, False, "silu", False),
    "mistral": (False, False, False, False, "silu", False),
    "qwen2": (False, False, False, False, "silu", True),
    "qwen3": (False, True, False, False, "silu", False),
    "gemma": (False, False, False, True, "gelu", False),
    "phi3": (True, False, True, False, "silu", False),
}

def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_exact_and_structure(family):
    ir, model = tiny_ir(family)
    for shape in [(1, 1), (2, 7), (3, 33)]:   # dynamic batch and sequence, including one token
        x = torch.randint(0, 256, shape)
        with torch.no_grad():
            assert rel(ir(x), model(x).logits) <= 1e-5
    s = ir.analysis
    fused_qkv, qk_norm, fused_gu, tied, act, q_bias = EXPECT[family]
    summ = s.summary()
    assert (summ["layers"], summ["heads"], summ["kv_heads"], summ["head_dim"]) == (2, 4, 2, 16)
    assert (summ["fused_qkv"], summ["qk_norm"], summ["fused_gate_up"], summ["tied_embedding"], summ["activation"]) \
        == (fused_qkv, qk_norm, fused_gu, tied, act)
    assert len(s.blocks) == 4 and [b.attention is not None for b in s.blocks] == [True, False, True, False]
    assert s.stream[-1] is s.final_norm.input and s.lm_head.module == "lm_head"
    for a in s.attentions:
        assert (a.q.bias is not None) == q_bias
        assert a.rope_q is not None and a.rope_k is not None
        assert a.o.node.args[0] is not None and a.o.out_features == 64
    for m in s.mlps:
        assert m.down.in_features == 96 and m.gate is not None
    # every pre-norm feeds the block's input linears; linears carry module paths and handles
    assert all(n.consumers for n in s.norms if n is not s.final_norm and n.other_users == [])
    assert all(lin.module and meta.HANDLE in lin.node.meta for lin in s.linears.values())
    handles = [n.meta[meta.HANDLE] for n in ir.graph.nodes]
    assert len(handles) == len(set(handles))


def test_capture_stories_exact(stories_ir, stories_model):
    x = torch.randint(0, 512, (2, 100))
    with torch.no_grad():
        assert rel(stories_ir(x), stories_model(x).logits) <= 1e-5
    s = stories_ir.analysis.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["tied_embedding"]) == (5, 8, 4, 8, True)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_capture_exact_on_more_families(family):
    """Captured exactly, with GPT-2's Conv1D (addmm over a transposed weight) and Falcon's x @ W.T
    canonicalized to linears."""
    ir, model = tiny_ir(family)
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert rel(ir(x), model(x).logits) <= 1e-5
    assert not any(n.target in (aten.addmm.default, aten.numpy_T.default) for n in ir.graph.nodes)
    assert len(ir.linears.linears) >= 9


def test_attention_spelled_out_in_matmuls_becomes_one_attention_op():
    """BLOOM: baddbmm(ALiBi, q, k^T) * scale, + mask, softmax, bmm with v, on [batch*heads, ...]
    tensors, becomes scaled_dot_product_attention over [batch, heads, seq, head_dim] with the ALiBi
    bias and the mask summed into attn_mask; the logits stay transformers'."""
    ir, model = tiny_ir("bloom")
    ops = [n.target for n in ir.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    assert ops.count(aten.scaled_dot_product_attention.default) == 2
    assert not {aten.softmax.int, aten.bmm.default, aten.baddbmm.default} & set(ops)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    assert ((ir(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    assert ir.analysis.summary()["heads"] == 4 and ir.analysis.attentions[0].fused_qkv
