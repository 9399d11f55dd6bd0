import pytest
import torch

from lowbit.ir.printer import format_ir
from lowbit.passes import PassContext, PassManager
from lowbit.passes.fold_norms import FoldNorms
from models import FAMILIES, MORE_FAMILIES, tiny_ir

aten = torch.ops.aten


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def scale_muls(ir):
    """mul nodes reading a norm-weight parameter (directly or through +1)."""
    return [n for n in ir.graph.nodes if n.target is aten.mul.Tensor and any(
        getattr(a, "op", None) == "get_attr" or getattr(a, "target", None) is aten.add.Tensor for a in n.args)]


@pytest.mark.parametrize("family", FAMILIES)
def test_fold_norms_exact_and_structural(family):
    ir, model = tiny_ir(family)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    before = {n.name for n in ir.analysis.norms if n.weight}
    res = FoldNorms().run(ir, PassContext())
    assert res.modified is True
    assert rel(ir(x), ref) <= 1e-4
    after = ir.analysis
    still = {n.name for n in after.norms if n.weight}
    if family == "qwen3":   # q/k norms feed RoPE, not a linear: they stay, with a reason
        assert len(still) == 4 and all("not a linear" in why for why in res.stats["skipped"].values())
    else:
        assert still == set() and res.stats["skipped"] == {}
    assert res.stats["folded"] == len(before) - len(still)
    for norm in after.norms:
        if norm.weight is None:
            assert norm.output is norm.normalized and all(c.node.args[0] is norm.normalized for c in norm.consumers)
    if family == "gemma":   # tied lm_head is untied so the embedding keeps its weight
        assert res.stats["untied"] == ["lm_head"] and not after.tied_embedding


def test_fold_norms_idempotent_and_not_firing():
    ir, _ = tiny_ir("llama")
    FoldNorms().run(ir, PassContext())
    text = format_ir(ir)
    res = FoldNorms().run(ir, PassContext())
    assert res.modified is False and format_ir(ir) == text


def test_fold_norms_stories(stories_ir, stories_model):
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        ref = stories_model(x).logits
    assert FoldNorms().run(stories_ir, PassContext()).modified
    assert rel(stories_ir(x), ref) <= 1e-4


def test_before_expected():
    """Each norm's scale moves into the linears reading it; the norms become pure normalizations."""
    from graphs import Tiny, assert_matches, folded, ir_of, weights
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("fold-norms").run(ir)
    assert_matches(ir, ir_of(Tiny(folded(w), norms=False)), rtol=1e-5)


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_fold_norms_on_more_families(family):
    """LayerNorm weight and bias fold into the linears they feed (W diag(g), c + W b), through views
    that keep the last dim; norms that feed no linear (post-norms, q/k norms before the head split,
    and a MoE block's norm folds into its router and every expert) stay, each with its reason."""
    ir, model = tiny_ir(family)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    PassManager("fold-norms").run(ir)
    assert ((ir(x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    st = ir.stats[-1]
    expect = {"olmo2": (1, 8), "gemma3_text": (5, 8), "bloom": (6, 0)}.get(family, (5, 0))   # BLOOM: + its embedding's norm
    assert (st["folded"], len(st["skipped"])) == expect, st
    assert all("not a linear" in why for why in st["skipped"].values())
    layer_norms = [n for n in ir.graph.nodes if n.target is torch.ops.aten.layer_norm.default]
    assert all(n.args[2] is None and n.args[3] is None for n in layer_norms)
    assert not PassManager("fold-norms").run(ir)[0].modified   # nothing left to fold


def test_a_norm_right_after_the_embedding_folds_into_the_table():
    """BLOOM's word_embeddings_layernorm is a function of the token alone: the lookup reads the
    normalized table (a copy: lm_head keeps reading the tied original) and the norm is gone; the
    analysis then starts the stream at the lookup."""
    ir, model = tiny_ir("bloom")
    assert ir.analysis.embedding_norm is not None and ir.analysis.stream[0] is ir.analysis.embedding_norm.output
    PassManager("fold-norms").run(ir)
    s = ir.analysis
    assert s.embedding_norm is None and s.stream[0] is s.embedding
    assert s.embedding_weight.endswith(".normed") and not s.tied_embedding
    assert sum(n.target is torch.ops.aten.layer_norm.default for n in ir.graph.nodes) == 5   # 2 per block, final
