"""The PyTorch reference runtime: runs any IR (captured, or after any pass) on CPU, lowbit's
custom ops through their reference implementations.

Weights that stored tensors alone determine (a dequantize, a lookup-table decode, a sparse add on
top) are computed once when the backend is built, not on every forward: the same ops on the same
tensors, so the logits are identical, and perplexity runs at float speed."""
from __future__ import annotations

import torch
import torch.fx as fx

from lowbit.ir import formats

_WEIGHT_OPS = formats.DENSE_OPS | formats.ADDITIVE_OPS


def fold_weights(ir) -> fx.GraphModule:
    """A module over a copy of the graph (sharing the IR's tensors) in which every weight op whose
    inputs are all stored tensors is replaced by its result."""
    fork = ir.fork()
    stored = {n for n in fork.graph.nodes if n.op == "get_attr"}
    for n in fork.graph.nodes:   # topological: an op over stored tensors is itself stored
        if n.op == "call_function" and n.target in _WEIGHT_OPS and set(n.all_input_nodes) <= stored:
            stored.add(n)
    outer = [n for n in fork.graph.nodes if n in stored and n.op == "call_function"
             and any(u not in stored for u in n.users)]
    for i, n in enumerate(outer):
        fork.set_tensor(f"_folded_{i}", ir.constant(n))   # ir's tensors: the fork shares them
        with fork.graph.inserting_before(n):
            attr = fork.graph.get_attr(f"_folded_{i}")
        n.replace_all_uses_with(attr)
    fork.graph.eliminate_dead_code()
    fork.gm.recompile()
    return fork.gm


class ReferenceBackend:
    name = "torch"

    def __init__(self, ir):
        self.ir = ir
        with torch.no_grad():
            self.gm = fold_weights(ir)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] int64 -> [batch, seq, vocab] float32."""
        return self.gm(input_ids)
