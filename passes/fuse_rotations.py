from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from lowbit.ir import meta
from lowbit.ir.analysis import LAYOUT_OPS, node_shape
from lowbit.ir.hadamard import (DENSE_UP_TO, kron_hadamard, kron_rotate, random_hadamard, random_orthogonal, random_signs,
                                rotate_kron, supported)

from .base import Exact, Needs, Pass, PassContext, PassFailure, PassResult, by_rows, in_float64, register

aten = torch.ops.aten

LEARNED_R1 = "rotations.R1"     # where learn-rotations leaves its matrices for kind=learned


def smooth_v(layer: int) -> str:
    return f"smooth.v.{layer}"


def smooth_down(layer: int) -> str:
    return f"smooth.down.{layer}"


def per_query_head(values, a):
    """A per-channel vector over an attention's values [kv_heads * head_dim], repeated for the query
    heads reading each value head (grouped-query attention): [heads * head_dim], o_proj's input."""
    return values.view(-1, a.head_dim).repeat_interleave(a.n_heads // a.n_kv_heads, 0).flatten()


def scale_rows(ir, lin, s):
    """A linear's output channels (weight rows, bias) times s, computed in float64."""
    ir.rewrite(lin.weight, lambda w: (w.double() * s[:, None]).float())
    if lin.bias:
        ir.rewrite(lin.bias, lambda b: (b.double() * s).float())


def divide_values(ir, a, sv):
    """An attention's values (the rows of v that produce them) divided by sv, one per value channel."""
    inv = torch.ones(ir.placeholder(a.v.weight).shape[0], dtype=torch.float64)
    inv[a.v_rows] = 1 / sv
    scale_rows(ir, a.v, inv)


def learned_r2(layer: int) -> str:
    return f"rotations.R2.{layer}"


def make_rotation(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind == "hadamard":
        return random_hadamard(n, seed)
    return random_orthogonal(n, seed)


def stream_readers(s):
    """Linears reading the residual stream (through a pure normalization), lm_head included."""
    return [lin for b in s.blocks for lin in b.norm.consumers] + s.final_norm.consumers


def writer(b):
    """The linear ending a block's branch."""
    return b.attention.o if b.attention else b.mlp.down


def stream_writers(s):
    """Linears whose output is added into the residual stream as it is (a writer behind a
    post-norm is not: its branch is rotated online after the norm)."""
    return [writer(b) for b in s.blocks if b.post_norm is None]


def rotate_online(ir, s, r1: torch.Tensor | None, hadamard_signs: torch.Tensor | None) -> int:
    """Each post-norm's output (Gemma3, OLMo2) times R1, online: a weighted norm between a writer
    and the stream does not commute with R1, so the writer stays as it is and the normalized,
    scaled branch is rotated before the add. R1 = H diag(s) / sqrt(d) (kind=hadamard): the fast
    Hadamard transform then the signs, (K + log2(d/K) + 1) d multiply-adds per token and post-norm
    (H_K kron H_2^m); any other R1: a dense d x d product (lowbit.rotate_kron with A = R1), d^2."""
    posts = [b.post_norm for b in s.blocks if b.post_norm is not None]
    if not posts:
        return 0
    tensors = (("stream_rotation.signs", hadamard_signs),) if hadamard_signs is not None else \
        (("stream_rotation.r1", r1), ("stream_rotation.one", torch.ones(1, 1, dtype=r1.dtype)))
    for t, v in tensors:
        ir.set_tensor(t, v.float())
    from .insert_hadamard import InsertHadamard   # here: passes register in the order passes/__init__ imports them
    after = InsertHadamard._insert_after   # op(x, *tensors) after x, read by every user of x
    for n in dict.fromkeys(p.output for p in posts):
        if hadamard_signs is not None:
            h = after(ir, n)
            h.meta[meta.TYPE] = n.meta.get(meta.TYPE, "")
            out = after(ir, h, op=aten.mul.Tensor, tensors=[tensors[0][0]])
        else:
            out = after(ir, n, op=rotate_kron._opoverload, tensors=[t for t, _ in tensors])
        out.meta[meta.TYPE] = n.meta.get(meta.TYPE, "")
        _note(out, "R1 online (after a post-norm)")
    return len(posts)


def positions_table(s) -> str | None:
    """The stored table of learned absolute positions (GPT-2, OPT) when they are a plain lookup."""
    p = s.positions
    if p is not None and p.target is aten.embedding.default and p.args[0].op == "get_attr":
        return p.args[0].target
    return None


def stream_norms(s):
    return [b.norm for b in s.blocks] + [s.final_norm]


def center_stream(ir, s) -> int:
    """A stream read by LayerNorms made zero-mean, so each LayerNorm becomes an RMSNorm, which
    commutes with R1 (QuaRot's trick for OPT): each row of the embedding and position tables, and
    each writer's output (weight rows and bias), minus its mean over the hidden dim; every
    layer_norm(x) then equals x * rsqrt(mean(x^2) + eps) and is replaced by it. Exact up to
    rounding. Returns how many norms changed (0 for RMSNorm models)."""
    norms = stream_norms(s)
    if not any(n.kind == "layer" for n in norms):
        return 0
    if any(b.post_norm is not None for b in s.blocks):
        raise PassFailure("LayerNorms on the stream and a post-norm before the add: the branch cannot be centered",
                          next(b.post_norm.output for b in s.blocks if b.post_norm is not None))
    if not all(n.kind == "layer" for n in norms):
        raise PassFailure("the residual stream is read by both LayerNorms and RMSNorms; a rotation commutes "
                          "with neither mix", next(n for n in norms if n.kind == "rms").normalized)

    def center(target, dim):
        def f(t):
            t = t.double()
            return (t - t.mean(dim, keepdim=True)).float()
        ir.rewrite(target, f)
    for target in {s.embedding_weight, positions_table(s)} - {None}:
        center(target, 1)
    for lin in stream_writers(s):
        center(lin.weight, -2)   # output rows (of each expert)
        if lin.bias:
            center(lin.bias, -1)
    for n in norms:
        ln, x, typ = n.normalized, n.input, n.normalized.meta.get(meta.TYPE, "")
        one = re.sub(r",[^,\]]+\]$", ",1]", typ)
        sq = ir.insert(aten.pow.Tensor_Scalar, (x, 2), before=ln, like=ln, typ=typ)
        mean = ir.insert(aten.mean.dim, (sq, [-1], True), before=ln, like=ln, typ=one)
        var = ir.insert(aten.add.Tensor, (mean, n.eps), before=ln, like=ln, typ=one)
        r = ir.insert(aten.rsqrt.default, (var,), before=ln, like=ln, typ=one)
        ir.insert(aten.mul.Tensor, (x, r), before=ln, replace=ln)
    ir.changed()
    return len(norms)


def rotated_tensors(s, get, r1: torch.Tensor, r2s: list[torch.Tensor] | None):
    """The tensors a rotation changes, as (target, new value) one at a time, each read by `get` when
    its turn comes (pure, differentiable)."""
    for target, fn in rotations(s, r1, r2s).items():
        yield target, fn(get(target))


def rotations(s, r1: torch.Tensor | None, r2s: list[torch.Tensor] | None, times_r1=None) -> dict:
    """{target: function of its tensor}, for the tensors a rotation changes; times_r1(x) = x R1 along
    the last dimension (default: the dense product; a Hadamard R1 gives a fast one).

    R1 (row vectors: x_rot = x R1): embedding E R1 (and learned positions P R1); stream readers W R1; stream writers R1^T W,
    bias b R1. R2 per attention (shared by its heads, so grouped-query attention is unaffected):
    each value head's rows R2^T W_v,h (bias b_h R2) and o's input columns per head W_o,h R2.
    A tensor read by several of these roles (tied embedding and lm_head) is rotated once."""
    fns: dict[str, list] = {}   # target -> what it goes through, in order

    def put(target, fn):   # an R1 role: the first one a tensor has
        fns.setdefault(target, [fn])

    times_r1 = times_r1 or (lambda x: x @ r1)
    for table in {s.embedding_weight, positions_table(s)} - {None}:
        put(table, by_rows(times_r1))
    for lin in stream_readers(s):
        put(lin.weight, by_rows(times_r1))
    for lin in stream_writers(s):
        put(lin.weight, lambda w: times_r1(w.mT).mT)   # R1^T W = (W^T R1)^T (stacked experts: each)
        if lin.bias:
            put(lin.bias, times_r1)
    for a, r2 in zip(s.attentions, r2s or []):
        rows, hd = a.v_rows, a.head_dim

        def v_fn(w, rows=rows, r2=r2, hd=hd):
            heads = w[rows].reshape(-1, hd, *w.shape[1:])     # [kv_heads, hd, (in)]
            out = w.clone()
            out[rows] = torch.einsum("ji,hj...->hi...", r2, heads).reshape(len(rows), *w.shape[1:])
            return out
        fns.setdefault(a.v.weight, []).append(v_fn)
        if a.v.bias:
            fns.setdefault(a.v.bias, []).append(v_fn)
        fns.setdefault(a.o.weight, []).append(lambda w, r2=r2, hd=hd: (w.reshape(w.shape[0], -1, hd) @ r2).reshape(w.shape))

    def chain(fs):
        def f(t):
            for g in fs:
                t = g(t)
            return t
        f.by_rows = all(getattr(g, "by_rows", False) for g in fs)
        return f
    return {target: chain(fs) for target, fs in fns.items()}


def _note(node: fx.Node, text: str):
    node.meta.setdefault(meta.ROTATIONS, []).append(text)


@register
class FuseRotations(Pass):
    """Rotate the residual stream (R1) and each head's values (R2) by orthogonal matrices fused into weights."""
    name = "fuse-rotations"
    applications = "`R1` (the whole stream), then `R2 layer 0`, `R2 layer 1`, ...; one left out stays the identity"
    changes_basis = True
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
        # applications (ctx.applies): R1 over the whole stream, then R2 layer by layer; one left out is the identity
        with_r1 = ctx.applies("R1")
        centered = center_stream(ir, s) if with_r1 else 0
        s = ir.analysis
        d = ir.placeholder(s.embedding_weight).shape[1]
        fast = with_r1 and c.kind == "hadamard" and d > DENSE_UP_TO   # x R1 = (x (A kron B)) diag(s): R1 never made
        r1 = None if fast else self._matrix(ir, LEARNED_R1, d, c.seed) if with_r1 else torch.eye(d, dtype=torch.float64)
        with_r2 = [c.r2 and ctx.applies(f"R2 layer {i}") for i in range(len(s.attentions))]
        r2s = [self._matrix(ir, learned_r2(i), a.head_dim, c.seed + 1 + i) if on else torch.eye(a.head_dim, dtype=torch.float64)
               for i, (a, on) in enumerate(zip(s.attentions, with_r2))] if any(with_r2) else None
        scaled = self._smooth(ir, s) if c.kind == "learned" else 0
        times_r1 = None
        if fast:
            factors, signs = kron_hadamard(d), random_signs(d, c.seed)

            def times_r1(x):
                return kron_rotate(x, *factors) * signs
        for target, fn in rotations(s, r1, r2s, times_r1).items():   # a weight left on disk is rotated when it is read
            ir.rewrite(target, lambda t, fn=fn: in_float64(fn, t))
        online = rotate_online(ir, s, r1, random_signs(d, c.seed) if c.kind == "hadamard" else None) if with_r1 else 0
        for lin in stream_readers(s) if with_r1 else []:
            _note(lin.node, "R1 in")
        for lin in stream_writers(s) if with_r1 else []:
            _note(lin.node, "R1^T out")
        for a, on in zip(s.attentions, with_r2):
            if on:
                _note(a.v.node, "R2^T out (per head)")
                _note(a.o.node, "R2 in (per head)")
        s.embedding.meta[meta.ROTATED] = {"kind": c.kind, "seed": c.seed, "r2": c.r2}
        ir.changed()
        return PassResult(True, {"kind": c.kind, "dim": d, "readers": len(stream_readers(s)),
                                 "writers": len(s.blocks), "r2_layers": sum(with_r2), "smoothed": scaled,
                                 "layer_norms_centered": centered, "online_after_post_norms": online})

    @staticmethod
    def _smooth(ir, s) -> int:
        """learn-rotations{smooth=true}'s per-channel scales, before the rotations: values v / s
        (v's rows) with o's input columns times s (per query head, through the GQA repeat); the
        down input / s (up's rows, the gate stays) with down's columns times s. Exact."""
        def scale_columns(target, s):
            ir.rewrite(target, lambda t: (t.double() * s).float())
        n = 0
        for i, a in enumerate(s.attentions):
            sv = ir.extra_tensors.get(smooth_v(i))
            if sv is None:
                continue
            divide_values(ir, a, sv)
            scale_columns(a.o.weight, per_query_head(sv, a))
            n += 1
        for i, m in enumerate(s.mlps):
            sd = ir.extra_tensors.get(smooth_down(i))
            if sd is None:
                continue
            scale_rows(ir, m.up, 1 / sd)
            scale_columns(m.down.weight, sd)
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
    """find/check: norms reading the stream are pure normalizations, each branch ends in its
    writer linear (or a post-norm right after it), the embedding scale (if any) is a scalar, and
    nothing else reads the stream."""
    if s.embedding_norm is not None:
        raise PassFailure(f"needs folded norms: the embedding's norm '{s.embedding_norm.name}' is the stream's first "
                          "value (run fold-norms first: it folds into the embedding table)", s.embedding_norm.output)
    for norm in stream_norms(s):
        if norm.weight is not None or norm.bias is not None:
            raise PassFailure(f"needs folded norms: '{norm.name}' still scales the stream (run fold-norms first)",
                              norm.output)
        if norm.other_users and norm.kind != "none":   # a stream read directly is checked below
            raise PassFailure(f"norm output is read by '{norm.other_users[0].name}', not only by linears",
                              norm.output)
    for lin in s.linears.values():
        if lin.frozen:
            raise PassFailure(f"'{lin.name}' is already quantized or split; rotate before quantize-weights "
                              "and split-outliers", lin.node)
    ends = {}   # residual add -> the branch ends writing into it (two for a parallel block)
    for b in s.blocks:
        post = b.post_norm
        if post is not None and (post.input is not writer(b).node or len(post.output.users) != 1):
            raise PassFailure(f"a post-norm reading more than '{writer(b).name}' or read by more than the residual "
                              "add; R1 cannot be applied after it", post.output)
        ends.setdefault(b.add, []).append((writer(b).name, writer(b).node if post is None else post.output))
    for add, parts in ends.items():
        branch = next(a for a in add.args[:2] if a not in s.stream)
        if set(_summands(branch)) != {node for _, node in parts}:
            raise PassFailure(f"residual branch ends in '{parts[0][0]}' through other ops; its output cannot be "
                              "rotated", add)
    scale = s.stream[0]
    if s.positions is not None:
        if positions_table(s) is None:
            raise PassFailure("learned positions that are not a lookup of a stored table", s.positions)
        scale = next(a for a in scale.args[:2] if a is not s.positions)
    if scale is not s.embedding:
        other = [a for a in scale.args if a is not s.embedding]
        if not all(isinstance(a, (int, float)) or (a.meta.get("val") is not None and a.meta["val"].numel() == 1)
                   for a in other):
            raise PassFailure("the embedding is scaled per channel; a rotation does not commute with it", scale)
    allowed = set(s.stream[1:])   # the next residual add, and the norm reading the value
    for norm in stream_norms(s):
        if norm.kind == "none":   # the block's linears read the stream itself
            allowed |= {lin.node for lin in norm.consumers}
        allowed |= {norm.normalized} | {u for u in norm.input.users if u.target is aten.pow.Tensor_Scalar}
    for v in s.stream:
        for u in v.users:
            if u not in allowed:
                raise PassFailure(f"the residual stream is read by '{u.name}', which a rotation would change", u)


def _summands(n: fx.Node) -> list[fx.Node]:
    """The terms of a sum of nodes (a parallel block's branches), each looked back through ops that
    commute with R1, or [n]."""
    n = _behind_row_ops(n)
    if n.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in n.args[:2]):
        return _summands(n.args[0]) + _summands(n.args[1])
    return [n]


def _behind_row_ops(n: fx.Node) -> fx.Node:
    """n looked back through ops that move or scale whole rows and leave the channels alone, so
    they commute with a rotation of the last dim: a product with a number (Granite's residual
    multiplier) or with one value per row (an MoE's routing weights), views keeping the last dim,
    row gathers and sums over other dims (the experts' outputs put back in token order and added)."""
    def width(a):
        return (node_shape(a) or (None,))[-1] if isinstance(a, fx.Node) else 1
    while True:
        w, a = width(n), n.args[0] if n.args else None
        if n.target is aten.mul.Tensor:
            full = [x for x in n.args[:2] if isinstance(x, fx.Node) and width(x) == w]
            rest = [x for x in n.args[:2] if not (isinstance(x, fx.Node) and width(x) == w)]
            if len(full) != 1 or len(rest) != 1 or width(rest[0]) != 1:
                return n
            n = full[0]
        elif (n.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default) and width(a) == w
              or n.target is aten.index.Tensor and len(n.args[1]) == 1 and len(node_shape(a) or ()) == 2
              or n.target is aten.sum.dim_IntList and all(d % len(node_shape(a) or (0,)) != len(node_shape(a)) - 1
                                                          for d in n.args[1])):
            n = a
        else:
            return n


def check_head_path(a):
    """R2 must pass from v to o through layout ops only (no value mixing within a head); of a fused
    projection, only the path to the attention's values is followed."""
    path, todo = set(), [a.sdpa.args[2]]
    while todo:
        n = todo.pop()
        if n not in path:
            path.add(n)
            todo += n.all_input_nodes
    todo, seen = [a.v.node], set()
    while todo:
        n = todo.pop()
        for u in n.users:
            if u is a.sdpa:
                if u.args[2] is not n:
                    raise PassFailure("the value projection feeds attention other than as values", u)
                continue
            if u in seen or (a.fused_qkv and u not in path):   # the q or k part of a fused projection
                continue
            seen.add(u)
            if u.target not in LAYOUT_OPS:
                raise PassFailure(f"R2 cannot pass '{u.name}' ({u.target}) between v and attention", u)
            todo.append(u)
    cur = a.sdpa
    while cur is not a.o.node:
        nxt = list(cur.users)
        if len(nxt) != 1 or (nxt[0] is not a.o.node and nxt[0].target not in LAYOUT_OPS):
            raise PassFailure("attention output reaches o_proj through ops other than layout changes", cur)
        cur = nxt[0]
