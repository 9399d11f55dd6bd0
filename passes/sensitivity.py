"""Weight sensitivity for SqueezeLLM, split-outliers and mixed precision: the diagonal of the Fisher
information, estimated as the sum over calibration sequences of the squared gradient of each
sequence's mean next-token loss (SqueezeLLM, Kim et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .base import PassContext, PassFailure, all_sum, my_share


def fisher(ir, ctx: PassContext, samples: int) -> dict[str, torch.Tensor]:
    """{linear node name: F [N, K] float32 (an expert stack's rows stacked)} for every linear with an unquantized weight,
    computed once per compile on the weights as they are when first asked (later passes share it).
    Gradients flow through lowbit.sparse_add, so a weight already split still gets its Fisher."""
    key = ("fisher", samples)
    if key in ir.scratch:
        return ir.scratch[key]
    if ctx.calib is None:
        raise PassFailure("needs calibration text for the Fisher information (compile --calib FILE)")
    lins = [lin for lin in ir.linears.linears.values() if not lin.quantized]
    seqs = my_share(ctx.calib[:samples])   # with several processes: a share each, the sums added
    bar = tqdm(seqs, desc="fisher information", unit="seq", disable=not ctx.progress, leave=False)
    if ir.stored and ir.spill is not None:   # a model left on disk: block by block
        acc = _Blocks(ir, {lin.weight for lin in lins}).fisher(bar)
    else:
        params = {lin.weight: ir.tensor(lin.weight).detach().float().requires_grad_() for lin in lins}
        acc = {t: torch.zeros_like(p) for t, p in params.items()}
        for ids in bar:
            logits = torch.func.functional_call(ir.gm, params, (ids[None],))
            loss = F.cross_entropy(logits[0, :-1], ids[1:])
            grads = torch.autograd.grad(loss, list(params.values()))
            for t, g in zip(params, grads):
                acc[t] += g.square()
    ir.scratch[key] = {lin.node.name: all_sum(acc[lin.weight]).reshape(lin.rows, -1) for lin in lins}
    return ir.scratch[key]


def rank_for_precision(ir, ctx: PassContext, lins, low, high, samples: int) -> list[dict]:
    """The linears in the order in which a higher precision pays most: each one's Fisher-weighted
    squared rounding error on the low scheme's grid minus on the high one's (round to nearest as the
    proxy, whatever the method: `low` and `high` are quantize-weights schemes), over the bytes the
    higher precision adds. Each entry: the linear, its gain, and its bytes at each precision."""
    from .quantize_weights import QUANTIZERS
    fish = fisher(ir, ctx, samples)
    ranked = []
    for lin in lins:
        w = ir.tensor(lin.weight).float().reshape(lin.rows, -1)
        f = fish[lin.node.name]
        err, size = {}, {}
        for name, scheme in (("low", low), ("high", high)):
            p = QUANTIZERS[type(scheme)](scheme, w, None, f)
            err[name], size[name] = (f * (w - p.w_hat()).square()).sum().item(), p.nbytes()
        ranked.append({"linear": lin, "gain": err["low"] - err["high"], "weights": w.numel(),
                       "low_bytes": size["low"], "high_bytes": size["high"]})
    return sorted(ranked, key=lambda r: r["gain"] / max(r["high_bytes"] - r["low_bytes"], 1), reverse=True)


def within(ranked: list[dict], max_bpw: float) -> int | None:
    """How many of the ranked linears fit at the high precision within max_bpw bits per weight
    (the rest at the low one); None when the low precision alone does not fit."""
    n_w = sum(r["weights"] for r in ranked)
    low = sum(r["low_bytes"] for r in ranked)
    if 8 * low / n_w > max_bpw:
        return None
    k = 0
    for r in ranked:
        low += r["high_bytes"] - r["low_bytes"]
        if 8 * low / n_w > max_bpw:
            break
        k += 1
    return k


class _Blocks:
    """The loss's gradients for a model left on disk, one block at a time. The graph is cut at the
    residual stream's values (the analysis' `stream`): block i computes stream[i] from stream[i-1]
    and values made before it that no weight changes (positions, masks, RoPE tables). Per sequence:
    a forward sweep keeps the stream values and those carried values (each weight read when its node
    runs, then dropped), the head's loss is differentiated, and a backward sweep reruns each block
    from its saved input with its linears' weights as leaves, passing d loss / d stream[i-1] down.
    Memory: one block's weights and activations, and one sequence's stream values."""

    def __init__(self, ir, weights: set[str]):
        from lowbit.ir.graph import upstream
        from lowbit.ir.store import Segments
        self.ir, self.weights, self.cut = ir, weights, Segments(ir)
        self.stream, self.segments = self.cut.stream, self.cut.segments
        # values a later block reads: each stream value by the next block only, and values no weight
        # changes (else refused by name: the gradient would not reach them)
        self.carried = set(self.cut.later)
        for v, used in self.cut.later.items():
            if v in self.stream and used == {self.cut.seg[v] + 1}:
                continue
            if v in self.stream or any(u.op == "get_attr" and u.target in weights for u in upstream(v)):
                raise PassFailure(f"the Fisher information of a model on disk runs block by block, and '{v.name}' "
                                  "carries a weight's effect past the next block", v)

    def _run(self, k, env, leaves=None):
        """Run block k over env (values of other nodes); weights read from the IR (from disk), those
        in `leaves` (a dict filled here) made leaves that require gradients."""
        def value(a):
            if a.op != "get_attr":
                return env[a]
            t = self.ir.tensor(a.target)
            if leaves is not None and a.target in self.weights:
                t = leaves.setdefault(a.target, t.detach().float().requires_grad_())
            return t
        self.cut.run(k, env, value)

    def fisher(self, seqs) -> dict[str, torch.Tensor]:
        """{weight target: sum over sequences of the squared gradient of each one's mean loss}."""
        acc: dict[str, torch.Tensor] = {}
        last = len(self.segments) - 1
        start = self.cut.start
        for ids in seqs:
            env, saved = {start: ids[None]}, {}
            with torch.no_grad():
                for k, nodes in enumerate(self.segments[:last]):
                    self._run(k, env)
                    saved.update({n: env[n] for n in nodes if n in self.carried})
                    env = dict(saved)   # what later blocks read; the rest of this block is dropped
            grads: dict[str, torch.Tensor] = {}   # a weight read in two blocks (a tied table): both parts

            def block(k, inputs):
                leaves = {}
                env = {**saved, **inputs}
                self._run(k, env, leaves)
                return env, leaves

            def collect(leaves):
                for t, p in leaves.items():
                    if p.grad is not None:
                        grads[t] = grads[t] + p.grad if t in grads else p.grad

            x = saved[self.stream[-1]].detach().requires_grad_()   # the head: final norm, output, loss
            env, leaves = block(last, {self.stream[-1]: x})
            out = next(n for n in self.segments[last] if n.op == "output")
            F.cross_entropy(env[out][0, :-1], ids[1:]).backward()
            collect(leaves)
            for k in range(last - 1, -1, -1):   # block k: stream[k-1] (the tokens for k = 0) -> stream[k]
                grad = x.grad
                x = saved[self.stream[k - 1]].detach().requires_grad_() if k else None
                env, leaves = block(k, {self.stream[k - 1]: x} if k else {start: ids[None]})
                if x is not None or leaves:
                    env[self.stream[k]].backward(grad)
                    collect(leaves)
            for t, g in grads.items():
                acc[t] = acc[t] + g.square() if t in acc else g.square()
        return acc
