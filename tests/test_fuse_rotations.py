"""fuse-rotations (with insert-hadamard, as recipes use them): exact on every family, refusals that name the reason."""
import copy
import re

import pytest
import torch

from lowbit.ir import meta
from lowbit.ir.artifact import save_artifact
from lowbit.ir.hadamard import kron_rotate
from lowbit.ir.printer import format_ir
from lowbit.passes import PassManager, PipelineError
from lowbit.passes.instruments import NumericDiff, Verify
from models import FAMILIES, tiny_ir

HAD = torch.ops.lowbit.hadamard.default
ROTATE = "fold-norms,fuse-rotations{{kind={kind}}},insert-hadamard"


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_on_every_family(family, kind):
    ir, model = tiny_ir(family)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(x).logits
    nd = NumericDiff(x)
    PassManager(ROTATE.format(kind=kind), [Verify(), nd]).run(ir)
    assert rel(ir(x), ref) <= 1e-4
    assert [r["pass"] for r in nd.report][1:] == [f"fuse-rotations{{kind={kind}}}", "insert-hadamard"]
    assert all(r["rel_err"] <= 1e-4 for r in nd.report)
    s = ir.analysis
    # structure: R4 before every down projection, R3 after RoPE on q and k, notes on the linears
    assert all(m.down.node.args[0].target is HAD for m in s.mlps)
    assert all(any(u.target is HAD for u in r.users) for a in s.attentions for r in (a.rope_q, a.rope_k))
    assert sum(n.target is HAD for n in ir.graph.nodes) == 3 * len(s.attentions)
    assert all("R1 in" in lin.node.meta[meta.ROTATIONS] for b in s.blocks for lin in b.norm.consumers)
    assert all("R1^T out" in (b.attention.o if b.attention else b.mlp.down).node.meta[meta.ROTATIONS]
               for b in s.blocks)
    assert "R2^T out (per head)" in s.attentions[0].v.node.meta[meta.ROTATIONS]
    assert s.embedding.meta[meta.ROTATED] == {"kind": kind, "seed": 0, "r2": True}


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "gemma3_text", "mixtral", "qwen2_moe"])
def test_kronecker_products_agree_with_dense(family, monkeypatch):
    """Above DENSE_UP_TO, a Hadamard R1 and R4 are applied to the weights through their Kronecker
    factors (kron_rotate), never formed. With the threshold at 0: every tensor is the dense
    products' to float rounding, and the model is unchanged."""
    import lowbit.passes.fuse_rotations as fuse
    import lowbit.passes.insert_hadamard as insert
    dense, model = tiny_ir(family)
    PassManager(ROTATE.format(kind="hadamard")).run(dense)
    ir, _ = tiny_ir(family)
    calls = []

    def counted(x, a, b, inverse=False):
        calls.append(x.shape)
        return kron_rotate(x, a, b, inverse)
    for m in (fuse, insert):
        monkeypatch.setattr(m, "DENSE_UP_TO", 0)
        monkeypatch.setattr(m, "kron_rotate", counted)
    PassManager(ROTATE.format(kind="hadamard")).run(ir)
    s = ir.analysis
    readers, downs = {lin.weight for lin in fuse.stream_readers(s)}, {m.down.weight for m in s.mlps}
    assert len(calls) >= len(readers) + len(downs)   # every reader's W R1, each down's W R4
    targets = [n.target for n in ir.graph.nodes if n.op == "get_attr"]
    assert targets == [n.target for n in dense.graph.nodes if n.op == "get_attr"]
    for t in targets:
        a, b = ir.tensor(t), dense.tensor(t)
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-6 * b.abs().max(), t
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert rel(ir(x), model(x).logits) <= 1e-4


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_exact_on_stories(stories_ir, stories_model, kind):
    x = torch.randint(0, 512, (2, 100))
    with torch.no_grad():
        ref = stories_model(x).logits
    PassManager(ROTATE.format(kind=kind)).run(stories_ir)
    assert rel(stories_ir(x), ref) <= 1e-4 and stories_ir.stats[-1]["r4"] == 5   # hidden 172: H_172


@pytest.mark.parametrize("kind", ["hadamard", pytest.param("orthogonal", marks=pytest.mark.slow)])
def test_exact_on_default_model(_smol_captured, smol_model, kind):
    ir = copy.deepcopy(_smol_captured)
    x = torch.tensor([ir.tokenizer.encode("Rotations leave the function unchanged, up to rounding.")])
    with torch.no_grad():
        ref = smol_model(x).logits
    PassManager(ROTATE.format(kind=kind)).run(ir)   # 576 = 36*16, 1536 = 12*128, head_dim 64
    assert rel(ir(x), ref) <= 1e-4


def test_twice_is_idempotent_or_rejected():
    ir, _ = tiny_ir("llama")
    PassManager(ROTATE.format(kind="hadamard")).run(ir)
    def graph_text():   # the dump without its '# pipeline:' header, which lists every entry run
        return format_ir(ir).split("\n", 2)[2]
    text = graph_text()
    res = PassManager("fuse-rotations{kind=hadamard},insert-hadamard", done=ir.passes_run).run(ir)
    assert [r.modified for r in res] == [False, False] and graph_text() == text
    with pytest.raises(PipelineError, match="already rotated.*refusing to rotate it again"):
        PassManager("fuse-rotations{kind=orthogonal}", done=ir.passes_run).run(ir)


def test_refusals_name_the_reason():
    # declared order: refused when the text is parsed, before anything runs
    for text, match in (("fuse-rotations", "'fuse-rotations' needs fold-norms before it"),
                        ("fold-norms,quantize-weights,fuse-rotations", "'fuse-rotations' must come before 'quantize-weights'"),
                        ("fold-norms,quantize-weights,insert-hadamard{r3=false}",
                         "'insert-hadamard{r3=false}' must come before 'quantize-weights'"),
                        ("fold-norms,learn-rotations,fuse-rotations{kind=learned}",
                         "'learn-rotations' with loss=ce: needs quantize-weights after it"),
                        ("fold-norms,fuse-rotations{kind=learned}",
                         "'fuse-rotations{kind=learned}' with kind=learned: needs learn-rotations before it")):
        with pytest.raises(PipelineError, match=re.escape(match)):
            PassManager(text)
    ir, _ = tiny_ir("llama")
    PassManager("quantize-weights").run(ir)
    with pytest.raises(PipelineError, match=re.escape("'fuse-rotations' must come before 'quantize-weights', "
                                                      "which already ran on this model")):
        PassManager("fold-norms,fuse-rotations", done=ir.passes_run)
    # the passes themselves still refuse a graph in the wrong state, naming the reason
    ir, _ = tiny_ir("llama")
    with pytest.raises(PipelineError, match=r"needs folded norms: '.*input_layernorm.weight' still scales"):
        PassManager("fuse-rotations", done=["fold-norms"]).run(ir)
    ir, _ = tiny_ir("llama")
    PassManager("fold-norms,quantize-weights").run(ir)
    with pytest.raises(PipelineError, match="already quantized or split; rotate before quantize-weights"):
        PassManager("fuse-rotations", done=["fold-norms"]).run(ir)
    with pytest.raises(PipelineError, match="already quantized or split; insert Hadamard before"):
        PassManager("insert-hadamard{r3=false}").run(ir)
    ir, _ = tiny_ir("llama")
    with pytest.raises(PipelineError, match="needs calibration text"):
        PassManager("fold-norms,learn-rotations,fuse-rotations{kind=learned},quantize-weights").run(ir)
    with pytest.raises(PipelineError, match="kind=learned needs 'rotations.R1' from learn-rotations"):
        PassManager("fuse-rotations{kind=learned}", done=["fold-norms", "learn-rotations"]).run(ir)


def test_rotated_artifact_loads_in_a_fresh_process(stories_ir, tmp_path):
    """The artifact's graph calls lowbit.hadamard and lowbit.dequantize; loading it must register
    them without the caller importing anything else."""
    import subprocess
    import sys
    PassManager(ROTATE.format(kind="hadamard") + ",quantize-weights{bits=4,group=-1}").run(stories_ir)
    save_artifact(stories_ir, tmp_path / "a", {})
    x = torch.randint(0, 512, (1, 32))
    torch.save(stories_ir(x), tmp_path / "ref.pt")
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from lowbit.ir.artifact import load_artifact; "
            f"ir = load_artifact(r'{tmp_path / 'a'}'); x = torch.load(r'{tmp_path / 'x.pt'}'); "
            f"sys.exit(0 if torch.equal(ir(x), torch.load(r'{tmp_path / 'ref.pt'}')) else 1)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fuse_rotations_before_expected():
    """R1: embedding E R1, readers W R1, writers R1^T W; R2 per head: v's rows R2^T, o's columns R2."""
    from graphs import HD, Tiny, assert_matches, folded, ir_of, weights
    from lowbit.ir.hadamard import random_hadamard
    w = folded(weights())
    ir = ir_of(Tiny(w, norms=False))
    PassManager("fuse-rotations{kind=hadamard,seed=3}", done=["fold-norms"]).run(ir)
    r1, r2 = random_hadamard(8, 3).float(), random_hadamard(HD, 4).float()
    e = {k: v.clone() for k, v in w.items()}
    e["emb"] = w["emb"] @ r1
    for k in ("q", "k", "v", "gate", "up", "lm_head"):
        e[k] = w[k] @ r1
    for k in ("o", "down"):
        e[k] = r1.T @ w[k]
    e["v"] = torch.cat([r2.T @ rows for rows in e["v"].split(HD)])
    e["o"] = torch.cat([cols @ r2 for cols in e["o"].split(HD, dim=1)], dim=1)
    assert_matches(ir, ir_of(Tiny(e, norms=False)), rtol=1e-5)
