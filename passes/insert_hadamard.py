from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.ir import meta
from lowbit.ir.hadamard import DENSE_UP_TO, hadamard, hadamard_matrix, kron_hadamard, kron_rotate, rotate_kron, supported

from .base import Exact, Needs, Pass, PassContext, PassFailure, PassResult, by_rows, in_float64, register

_OP = hadamard._opoverload
_KRON = rotate_kron._opoverload


def learned_r3(layer: int) -> str:
    """Where learn-rotations leaves attention `layer`'s R3 (head_dim x head_dim) for kind=learned."""
    return f"rotations.R3.{layer}"


def learned_r4(layer: int) -> tuple[str, str]:
    """Where learn-rotations leaves layer `layer`'s R4 factors (A, B; R4 = A kron B) for kind=learned."""
    return f"rotations.R4.{layer}.a", f"rotations.R4.{layer}.b"


@register
class InsertHadamard(Pass):
    """Online Hadamard transforms: R4 on the MLP down projection's input (inverse fused), R3 on q and k after RoPE.
    kind=learned: R4 is the Kronecker-factored rotation and R3 the head_dim rotation learn-rotations{loss=local}
    learned per layer."""
    name = "insert-hadamard"
    applications = "`R4 layer 0`, ... (MLP down inputs), then `R3 layer 0`, ... (q and k after RoPE)"
    changes_basis = True
    needs = (Needs("learn-rotations", when=(("kind", "learned"),)),)

    @dataclass(frozen=True)
    class Config:
        r3: bool = True
        r4: bool = True
        kind: str = "hadamard"   # of R3 and R4: hadamard | learned

        def __post_init__(self):
            if self.kind not in ("hadamard", "learned"):
                raise ValueError(f"kind must be hadamard or learned, got '{self.kind}'")

    def contract(self):
        return Exact(1e-4)

    def run(self, ir, ctx: PassContext) -> PassResult:
        s = ir.analysis
        r3 = r4 = 0
        if self.config.r4:
            for i, m in enumerate(s.mlps):
                down = m.down
                x = down.node.args[0]
                if getattr(x, "target", None) in (_OP, _KRON):
                    continue   # already inserted: idempotent
                if not ctx.applies(f"R4 layer {i}"):
                    continue
                if down.frozen:
                    raise PassFailure(f"'{down.name}' is already quantized or split; insert Hadamard before "
                                      "quantize-weights and split-outliers",
                                      down.node)
                n = down.in_features
                if self.config.kind == "learned":
                    keys = learned_r4(i)
                    if keys[0] not in ir.extra_tensors:
                        raise PassFailure(f"no learned R4 for '{down.name}': insert-hadamard{{kind=learned}} needs "
                                          "learn-rotations{loss=local} before it", down.node)
                    a, b = (ir.extra_tensors[k].double() for k in keys)
                    targets = [down.weight.rpartition(".")[0] + t for t in (".r4_a", ".r4_b")]
                    for t, f in zip(targets, (a, b)):
                        ir.set_tensor(t, f.float())
                    h = self._insert_after(ir, x, [down.node], _KRON, targets)
                    ab, dense = (a, b), (lambda a=a, b=b: torch.kron(a, b))
                    what = "R4 in (online learned Kronecker rotation)"
                else:
                    if not supported(n):
                        raise PassFailure(f"no Hadamard transform of order {n} for '{down.name}'s input", down.node)
                    h = self._insert_after(ir, x, users=[down.node])
                    ab, dense = kron_hadamard(n), (lambda n=n: hadamard_matrix(n) / n ** 0.5)
                    what = "R4 in (online Hadamard)"
                # rewrite: down(x) -> down'(x Q) with down' = W Q, Q = A kron B orthogonal, when the weight is read
                # (Q made then, once per read: n x n, too large to hold one per layer; above DENSE_UP_TO, never made)
                def times_q(w, ab=ab, dense=dense, n=n):
                    f = (lambda x: kron_rotate(x, *ab)) if n > DENSE_UP_TO else (lambda x, q=dense(): x @ q)
                    return in_float64(by_rows(f), w)
                ir.rewrite(down.weight, times_q)
                down.node.meta.setdefault(meta.ROTATIONS, []).append(what)
                h.meta[meta.TYPE] = x.meta.get(meta.TYPE, "")
                r4 += 1
        if self.config.r3:
            for i, a in enumerate(s.attentions):
                if any(u.target in (_OP, _KRON) for rope in (a.rope_q, a.rope_k) if rope is not None
                       for u in rope.users) or not ctx.applies(f"R3 layer {i}"):
                    continue
                targets = ()
                if self.config.kind == "learned":   # as rotate_kron with A = R3, B = [1]
                    if learned_r3(i) not in ir.extra_tensors:
                        raise PassFailure(f"no learned R3 for attention {i}: insert-hadamard{{kind=learned}} needs "
                                          "learn-rotations{loss=local} before it", a.sdpa)
                    targets = [a.k.weight.rpartition(".")[0] + t for t in (".r3_a", ".r3_b")]
                    ir.set_tensor(targets[0], ir.extra_tensors[learned_r3(i)].float())
                    ir.set_tensor(targets[1], torch.ones(1, 1))
                for rope, what in ((a.rope_q, "q"), (a.rope_k, "k")):
                    if rope is None:
                        raise PassFailure(f"no RoPE found on the {what} path: R3 goes after RoPE", a.sdpa)
                    if any(u.target in (_OP, _KRON) for u in rope.users):
                        continue
                    if not targets and not supported(a.head_dim):
                        raise PassFailure(f"no Hadamard transform of order {a.head_dim} (head_dim)", rope)
                    # q R3 and k R3 cancel inside q k^T: exact, and the cached keys are rotated
                    h = self._insert_after(ir, rope, op=_KRON if targets else _OP, tensors=targets)
                    h.meta[meta.TYPE] = rope.meta.get(meta.TYPE, "")
                    r3 += 1
        if not (r3 or r4):
            return PassResult(False)
        ir.changed()
        return PassResult(True, {"r3": r3, "r4": r4})

    @staticmethod
    def _insert_after(ir, x, users=None, op=_OP, tensors=()):
        """op(x, *tensors) after x, read by `users` (None: every user of x)."""
        h = ir.insert(op, (x,), after=x, swap=(x, users))
        h.args = (x, *[ir.get_attr(t, h) for t in tensors])
        return h
