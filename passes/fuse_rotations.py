from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.ir import meta
from lowbit.ir.hadamard import random_hadamard, random_orthogonal, supported

from .base import Exact, Needs, Pass, PassContext, PassFailure, PassResult, register

aten = torch.ops.aten

# ops that move whole heads around without mixing values within a head: R2 passes through them
_LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
               aten.permute.default, aten.unsqueeze.default, aten.expand.default, aten.slice.Tensor,
               aten.clone.default, aten.contiguous.default}

LEARNED_R1 = "rotations.R1"     # where learn-rotations leaves its matrices for kind=learned


def smooth_v(layer: int) -> str:
    return f"smooth.v.{layer}"


def smooth_down(layer: int) -> str:
    return f"smooth.down.{layer}"


def per_query_head(values, a):
    """A per-channel vector over an attention's values [kv_heads * head_dim], repeated for the query
    heads reading each value head (grouped-query attention): [heads * head_dim], o_proj's input."""
    return values.view(-1, a.head_dim).repeat_interleave(a.n_heads // a.n_kv_heads, 0).flatten()


def learned_r2(layer: int) -> str:
    return f"rotations.R2.{layer}"


def make_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return random_hadamard(n, seed)
    return random_orthogonal(n, seed)


def stream_readers(s):
    """Linears reading the residual stream (through a pure normalization), lm_head included."""
    return [lin for b in s.blocks for lin in b.norm.consumers] + s.final_norm.consumers


def stream_writers(s):
    """Linears whose output is added into the residual stream."""
    return [b.attention.o if b.attention else b.mlp.down for b in s.blocks]


def rotated_tensors(s, get, r1: torch.Tensor, r2s: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The tensors a rotation changes, computed without touching the IR (pure, differentiable).

    R1 (row vectors: x_rot = x R1): embedding E R1; stream readers W R1; stream writers R1^T W,
    bias b R1. R2 per attention (shared by its heads, so grouped-query attention is unaffected):
    each value head's rows R2^T W_v,h (bias b_h R2) and o's input columns per head W_o,h R2.
    A tensor read by several of these roles (tied embedding and lm_head) is rotated once."""
    out: dict[str, torch.Tensor] = {}

    def put(target, fn):
        if target not in out:
            out[target] = fn(get(target))

    def cur(target):
        return out[target] if target in out else get(target)

    put(s.embedding_weight, lambda e: e @ r1)
    for lin in stream_readers(s):
        put(lin.weight, lambda w: w @ r1)
    for lin in stream_writers(s):
        put(lin.weight, lambda w: r1.T @ w)
        if lin.bias:
            put(lin.bias, lambda b: b @ r1)
    for a, r2 in zip(s.attentions, r2s or []):
        start, stop, hd = *a.v_rows, a.head_dim

        def v_fn(w, start=start, stop=stop, r2=r2, hd=hd):
            heads = w[start:stop].reshape(-1, hd, *w.shape[1:])     # [kv_heads, hd, (in)]
            rot = torch.einsum("ji,hj...->hi...", r2, heads).reshape(stop - start, *w.shape[1:])
            return torch.cat([w[:start], rot, w[stop:]])
        out[a.v.weight] = v_fn(cur(a.v.weight))
        if a.v.bias:
            out[a.v.bias] = v_fn(cur(a.v.bias))
        w = cur(a.o.weight)
        out[a.o.weight] = (w.reshape(w.shape[0], -1, hd) @ r2).reshape(w.shape)
    return out


def _note(node: fx.Node, text: str):
    node.meta.setdefault(meta.ROTATIONS, []).append(text)


@register
class FuseRotations(Pass):
    """Rotate the residual stream (R1) and each head's values (R2) by orthogonal matrices fused into weights."""
    name = "fuse-rotations"
    needs = (Needs("fold-norms"), Needs("learn-rotations", when=(("kind", "learned"),)))

    @dataclass(frozen=True)
    class Config:
        kind: str = "hadamard"   # hadamard | orthogonal | learned
        seed: int = 0
        r2: bool = True

        def __post_init__(self):
            if self.kind not in ("hadamard", "orthogonal", "learned"):
                raise ValueError(f"kind must be hadamard, orthogonal or learned, got '{self.kind}'")

    def contract(self):
        return Exact(1e-4)

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        s = ir.analysis
        done = s.embedding.meta.get(meta.ROTATED)
        if done is not None:   # applying it again would rotate twice: same config is a no-op
            if done == {"kind": c.kind, "seed": c.seed, "r2": c.r2}:
                return PassResult(False, {"already": done})
            raise PassFailure(f"the residual stream is already rotated ({done}); refusing to rotate it again",
                              s.embedding)
        check_rotatable(s)
        if c.r2:
            for a in s.attentions:
                check_head_path(a)
        d = ir.tensor(s.embedding_weight).shape[1]
        r1 = self._matrix(ir, LEARNED_R1, d, c.seed)
        r2s = [self._matrix(ir, learned_r2(i), a.head_dim, c.seed + 1 + i) for i, a in enumerate(s.attentions)] \
            if c.r2 else None
        scaled = self._smooth(ir, s) if c.kind == "learned" else 0
        new = rotated_tensors(s, lambda t: ir.tensor(t).double(), r1, r2s)
        for target, t in new.items():
            ir.set_tensor(target, t.float())
        for lin in stream_readers(s):
            _note(lin.node, "R1 in")
        for lin in stream_writers(s):
            _note(lin.node, "R1^T out")
        for a in s.attentions if c.r2 else []:
            _note(a.v.node, "R2^T out (per head)")
            _note(a.o.node, "R2 in (per head)")
        s.embedding.meta[meta.ROTATED] = {"kind": c.kind, "seed": c.seed, "r2": c.r2}
        ir.changed()
        return PassResult(True, {"kind": c.kind, "dim": d, "readers": len(stream_readers(s)),
                                 "writers": len(s.blocks), "r2_layers": len(r2s or []), "smoothed": scaled})

    @staticmethod
    def _smooth(ir, s) -> int:
        """learn-rotations{smooth=true}'s per-channel scales, before the rotations: values v / s
        (v's rows) with o's input columns times s (per query head, through the GQA repeat); the
        down input / s (up's rows, the gate stays) with down's columns times s. Exact."""
        def scale(target, s, dim):
            t = ir.tensor(target).double()
            ir.set_tensor(target, (t * (s if dim == -1 else s[:, None])).float())
        n = 0
        for i, a in enumerate(s.attentions):
            sv = ir.extra_tensors.get(smooth_v(i))
            if sv is None:
                continue
            start, stop = a.v_rows
            inv = torch.ones(ir.tensor(a.v.weight).shape[0], dtype=torch.float64)
            inv[start:stop] = 1 / sv
            scale(a.v.weight, inv, 0)
            if a.v.bias:
                scale(a.v.bias, inv, -1)
            scale(a.o.weight, per_query_head(sv, a), -1)
            n += 1
        for i, m in enumerate(s.mlps):
            sd = ir.extra_tensors.get(smooth_down(i))
            if sd is None:
                continue
            scale(m.up.weight, 1 / sd, 0)
            if m.up.bias:
                scale(m.up.bias, 1 / sd, -1)
            scale(m.down.weight, sd, -1)
            n += 1
        return n

    def _matrix(self, ir, learned_target: str, n: int, seed: int) -> torch.Tensor:
        if self.config.kind == "learned":
            if learned_target not in ir.extra_tensors:
                raise PassFailure(f"kind=learned needs '{learned_target}' from learn-rotations, which did not run")
            return ir.extra_tensors[learned_target].double()
        if self.config.kind == "hadamard" and not supported(n):
            raise PassFailure(f"no Hadamard matrix of order {n} (use kind=orthogonal)")
        return make_rotation(self.config.kind, n, seed)


def check_rotatable(s):
    """find/check: norms reading the stream are pure normalizations, writers are linears, the
    embedding scale (if any) is a scalar, and nothing else reads the stream."""
    for norm in [b.norm for b in s.blocks] + [s.final_norm]:
        if norm.weight is not None:
            raise PassFailure(f"needs folded norms: '{norm.name}' still scales the stream (run fold-norms first)",
                              norm.output)
        if norm.other_users:
            raise PassFailure(f"norm output is read by '{norm.other_users[0].name}', not only by linears",
                              norm.output)
    for lin in s.linears.values():
        if lin.frozen:
            raise PassFailure(f"'{lin.name}' is already quantized or split; rotate before quantize-weights "
                              "and split-outliers", lin.node)
    for b, lin in zip(s.blocks, stream_writers(s)):
        if lin.node not in b.add.args:
            raise PassFailure(f"residual branch ends in '{lin.name}' through other ops; its output cannot be rotated",
                              b.add)
    scale = s.stream[0]
    if scale is not s.embedding:
        other = [a for a in scale.args if a is not s.embedding]
        if not all(isinstance(a, (int, float)) or (a.meta.get("val") is not None and a.meta["val"].numel() == 1)
                   for a in other):
            raise PassFailure("the embedding is scaled per channel; a rotation does not commute with it", scale)
    allowed = set(s.stream[1:])   # the next residual add, and the norm reading the value
    for norm in [b.norm for b in s.blocks] + [s.final_norm]:
        allowed |= {norm.normalized} | {u for u in norm.input.users if u.target is aten.pow.Tensor_Scalar}
    for v in s.stream:
        for u in v.users:
            if u not in allowed:
                raise PassFailure(f"the residual stream is read by '{u.name}', which a rotation would change", u)

def check_head_path(a):
    """R2 must pass from v to o through layout ops only (no value mixing within a head)."""
    todo, seen = [a.v.node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u is a.sdpa:
                if u.args[2] is not n:
                    raise PassFailure("the value projection feeds attention other than as values", u)
                continue
            if u in seen:
                continue
            seen.add(u)
            if n is a.v.node and a.fused_qkv and u.target is aten.slice.Tensor and u.args[2] != a.v_rows[0]:
                continue   # the q or k slice of a fused projection
            if u.target not in _LAYOUT_OPS:
                raise PassFailure(f"R2 cannot pass '{u.name}' ({u.target}) between v and attention", u)
            todo.append(u)
    cur = a.sdpa
    while cur is not a.o.node:
        nxt = list(cur.users)
        if len(nxt) != 1 or (nxt[0] is not a.o.node and nxt[0].target not in _LAYOUT_OPS):
            raise PassFailure("attention output reaches o_proj through ops other than layout changes", cur)
        cur = nxt[0]
