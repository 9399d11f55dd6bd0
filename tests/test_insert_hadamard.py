"""insert-hadamard: online Hadamards (R4 on down's input, R3 on q and k after RoPE), exact."""
import torch

from lowbit.passes import PassManager
from models import tiny_ir

HAD = torch.ops.lowbit.hadamard.default


def test_insert_hadamard_before_expected():
    """R4: an online Hadamard on down's input, its inverse fused into down's weight."""
    from graphs import FF, Tiny, assert_matches, ir_of, weights
    from lowbit.ir.hadamard import hadamard, hadamard_matrix
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("insert-hadamard{r3=false}").run(ir)
    e = dict(w, down=w["down"] @ (hadamard_matrix(FF) / FF ** 0.5).float())
    assert_matches(ir, ir_of(Tiny(e, hook=lambda name, x: hadamard(x) if name == "down" else x)), rtol=1e-5)


def test_does_not_fire_when_off_and_is_idempotent():
    ir, _ = tiny_ir("llama")
    before = [n.target for n in ir.graph.nodes]
    assert not PassManager("insert-hadamard{r3=false,r4=false}").run(ir)[0].modified
    assert [n.target for n in ir.graph.nodes] == before
    assert PassManager("insert-hadamard").run(ir)[0].modified
    after = [n.target for n in ir.graph.nodes]
    assert after.count(HAD) == 2 + 2 * 2   # R4 per MLP, R3 on q and k per attention (2 layers)
    assert not PassManager("insert-hadamard").run(ir)[0].modified and [n.target for n in ir.graph.nodes] == after
