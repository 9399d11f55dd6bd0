"""The decoder form of an IR: the same graph rewritten to take and return a KV cache, so text is
generated one token at a time instead of re-running the whole sequence.

    forward(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
            past_key_values.0.key, past_key_values.0.value, ...  [B, kv_heads, P, head_dim])
        -> (logits [B, S, vocab], present.0.key, present.0.value, ...  [B, kv_heads, P+S, head_dim])

With a KV quantizer (quantize-kv) the cache holds what a quantized cache stores: per layer and
K/V, `.key` uint8 codes (two 4-bit codes per byte), `.key_scale` float32 and `.key_zero` uint8
per token and group (ir/quant.py, kv_quantize), dequantized for the attention op.

This is the input/output layout of optimum's and onnxruntime-genai's decoder exports. The rewrite
is found from the graph, as every pass is: at each attention op, the keys and values are traced
back through any GQA head repeat (and a KV quantizer, which then runs before the cache, so the
cache holds quantized values) to their [B, kv_heads, S, head_dim] source; the past is concatenated
there, and the attention op reads the kv_heads heads itself (enable_gqa: no per-step copy of the
whole cache per query head). The mask becomes causal with the past offset,
and-ed with `attention_mask` (each query also sees itself, so a padding row never attends to
nothing). RoPE reads `position_ids` where the captured graph counted positions from 0."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import meta, quant
from .analysis import node_shape
from .errors import LowbitError
from .graph import IR, upstream

aten = torch.ops.aten
_KV_QUANT = quant.quantize_tokens._opoverload
_KV_Q, _KV_DQ = quant.kv_quantize._opoverload, quant.kv_dequantize._opoverload
_REPEAT = {aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default}
_FLOAT_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}


def _type(n) -> tuple[str, list[str]] | None:
    """(dtype, dims) from a node's type string, e.g. ('i64', ['1', 'seq', '1']); artifacts keep
    these where torch's fake values are not saved."""
    t = n.meta.get(meta.TYPE, "") if isinstance(n, fx.Node) else ""
    if not t and getattr(getattr(n, "target", None), "namespace", None) == "lowbit":
        return _type(n.args[0])   # lowbit's activation ops (Hadamard, quantizers) keep the shape
    if "[" not in t:
        return None
    dtype, dims = t[:-1].split("[", 1)
    return dtype, [x for x in dims.split(",") if x]


def _kv_source(x: fx.Node, sdpa: fx.Node):
    """Walk back from an attention input through the head repeat and a KV quantizer to the
    [B, kv_heads, S, head_dim] tensor; returns (source, quantizer args or None)."""
    qargs = None
    while x.op == "call_function" and (x.target in _REPEAT or x.target is _KV_QUANT):
        if x.target is _KV_QUANT:
            qargs = x.args[1:]
        x = x.args[0]
    t = _type(x)
    if t is None or len(t[1]) != 4:
        raise LowbitError(f"decoder: the keys/values of {sdpa.name} do not come from a [batch, heads, seq, head_dim] "
                          f"tensor (found {x.name}); this attention layout is not supported")
    return x, qargs


def _positions(d: IR) -> tuple[fx.Node, int]:
    """(the integer position tensor the captured graph computes, the offset o such that it holds
    position + o): the index of a learned position table (GPT-2: o = 0; OPT: o = 2, measured on
    the graph, which must count positions with step 1), or what RoPE turns into angles."""
    emb = d.analysis.positions
    if emb is None:
        try:
            return _rope_positions(d.graph), 0
        except LowbitError:
            if any(_alibi(a.sdpa) is not None for a in d.analysis.attentions):
                return None, 0   # ALiBi: positions only in the attention bias (_attend_over_cache)
            raise
    index = emb.args[1]
    n = 5
    try:
        _ProbeValue(d.gm, index).run(torch.zeros(1, n, dtype=torch.long))
        raise LowbitError("decoder: the position index was not computed")
    except _ProbeValue.Found as f:
        v = f.value
    steps = torch.arange(n)
    if not (isinstance(v, torch.Tensor) and v.shape[-1] == n and (v.reshape(-1, n) - steps == v.reshape(-1, n)[:, :1]).all()):
        raise LowbitError(f"decoder: the position table's index {index.name} does not count positions one by one")
    return index, int(v.reshape(-1)[0])


class _ProbeValue(fx.Interpreter):
    """Runs a graph until `node` is computed and raises its value."""

    class Found(Exception):
        def __init__(self, value):
            self.value = value

    def __init__(self, gm, node):
        super().__init__(gm)
        self.node = node

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.node:
            raise self.Found(out)
        return out


def _rope_positions(g: fx.Graph) -> fx.Node:
    """The integer position tensor RoPE turns into angles: an integer ancestor of the cos/sin ops
    that is cast to float, with the sequence as its second dimension ([1, seq, ...])."""
    trig = [n for n in g.nodes if n.op == "call_function" and n.target in (aten.cos.default, aten.sin.default)]
    found, seen, todo = set(), set(), list(trig)
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            todo.append(a)
            t = _type(a)
            if n.target in _FLOAT_CASTS and t and t[0][0] in "iu" and len(t[1]) >= 2 and t[1][1] == "seq":
                found.add(a)
    if len(found) != 1:
        raise LowbitError(f"decoder: expected one position tensor feeding RoPE or a learned position table, "
                          f"found {len(found)}")
    return found.pop()


def _mask_of(sdpa: fx.Node):
    return sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")


def _alibi(sdpa: fx.Node) -> fx.Node | None:
    """The per-head bias over key positions in an attention's captured mask (ALiBi): its float
    [batch, heads, 1, seq] ancestor, the same for every query; None for a plain mask."""
    mask = _mask_of(sdpa)
    if not isinstance(mask, fx.Node):
        return None
    found = [n for n in upstream(mask) if (t := _type(n)) and t[0][0] in "fb" and len(t[1]) == 4
             and t[1][0] == "batch" and t[1][1].isdigit() and int(t[1][1]) > 1 and t[1][2] == "1" and t[1][3] == "seq"]
    return max(found, key=lambda n: n.meta.get(meta.HANDLE, 0)) if found else None


def _alibi_over_cache(g, bias: fx.Node, mask_in: fx.Node, t: fx.Node, done: dict) -> fx.Node:
    """The ALiBi bias recomputed over the decoder's keys: it counts key positions from the
    implicit all-ones attention mask [batch, seq] of the captured graph (Falcon), which becomes the
    attention_mask input [batch, past + seq], as transformers computes it with a cache, or from
    the sequence length (BLOOM), which becomes the total length, as it does wherever the bias
    is computed from it."""
    if bias in done:
        return done[bias]
    anc = upstream(bias)
    ones = [n for n in anc if n.target is aten.ones.default and _type(n) and _type(n)[1] == ["batch", "seq"]]
    seq = {n for n in anc if n.target is aten.sym_size.int and n.args[1] == 1 and n.args[0].op == "placeholder"}
    if len(ones) > 1 or not (ones or seq):
        raise LowbitError(f"decoder: the attention bias {bias.name} is not computed from the attention mask or the "
                          "sequence length; cannot recompute it over the cache")
    between = {n for n in anc if upstream(n) & ({*ones} | seq)}
    for n in between:
        n.args = fx.node.map_arg(n.args, lambda a: t if a in seq else a)
        n.kwargs = fx.node.map_arg(n.kwargs, lambda a: t if a in seq else a)
    if ones:
        ones[0].replace_all_uses_with(mask_in)
    done[bias] = bias
    return bias


def _call(g, target, *args, **kwargs):
    return g.call_function(target, args, kwargs)


def to_decoder(ir: IR) -> IR:
    """An IR (a fork sharing this IR's tensors) whose graph is the KV-cache decoder above."""
    ir.whole("the KV-cache decoder")
    d = ir.fork()
    atts = d.analysis.attentions
    g = d.graph
    if not atts:
        raise LowbitError("decoder: the model has no attention op")
    phs = [n for n in g.nodes if n.op == "placeholder"]
    pos_node, offset = _positions(d)
    # what each attention caches: float K/V, or (with a KV quantizer) codes, scales and zero points
    plan = [[_kv_source(x, a.sdpa) for x in a.sdpa.args[1:3]] for a in atts]
    specs = _cache_specs(atts, plan)
    mask_in, pos_in, past, last = _inputs(g, phs[-1], specs)
    mask, lengths = _mask_and_positions(g, last.next, phs[0], mask_in, pos_in, pos_node, offset)
    presents, biases = [], {}
    for i, (a, kv) in enumerate(zip(atts, plan)):
        bias = _alibi(a.sdpa)
        if bias is not None:
            bias = _alibi_over_cache(g, bias, mask_in, lengths[1], biases)
        presents += _attend_over_cache(g, a, i, kv, past, mask, bias)
    out = next(n for n in g.nodes if n.op == "output")
    out.args = ((out.args[0], *presents),)
    g.eliminate_dead_code()
    # anything still counting positions from the captured sequence length would ignore the past
    # (an arange over the tokens of the batch, an MoE's routed rows, counts no positions)
    for n in g.nodes:
        if n.op == "call_function" and n.target is aten.arange.default and n.args and isinstance(n.args[0], fx.Node) \
                and n.args[0] not in lengths and node_shape(n) == ("seq",):
            raise LowbitError(f"decoder: {n.name} still counts positions of the new tokens only; "
                              "cannot convert this graph to a KV-cache decoder")
    g.lint()
    d.changed()
    d.past_specs = specs   # (name, dtype, heads, last dim) of each cache tensor, in input order
    return d


def _cache_specs(atts, plan) -> list[tuple]:
    """(name, dtype, heads, last dim) of each cache tensor: per attention and K/V, the float values,
    or uint8 codes (4-bit ones two per byte) with a float32 scale and uint8 zero point per group."""
    specs = []
    for i, (a, kv) in enumerate(zip(atts, plan)):
        for kind, (src, q) in zip(("key", "value"), kv):
            heads = int(_type(src)[1][1])   # kv_heads, or every query head where the graph repeats them first (Falcon)
            if q:
                bits, group = q[0], q[1]
                groups = 1 if group == -1 else a.head_dim // group
                specs += [(f"{i}.{kind}", torch.uint8, heads, a.head_dim // 2 if bits <= 4 else a.head_dim),
                          (f"{i}.{kind}_scale", torch.float32, heads, groups),
                          (f"{i}.{kind}_zero", torch.uint8, heads, groups)]
            else:
                specs.append((f"{i}.{kind}", torch.float32, heads, a.head_dim))
    return specs


def _inputs(g, after: fx.Node, specs):
    """attention_mask, position_ids and one past_key_values input per cache tensor, after `after`;
    returns them and the last one."""
    with g.inserting_after(after):
        mask_in = g.placeholder("attention_mask")
    with g.inserting_after(mask_in):
        pos_in = g.placeholder("position_ids")
    last, past = pos_in, {}
    for name, *_ in specs:
        with g.inserting_after(last):
            last = past[name] = g.placeholder("past_key_values_" + name.replace(".", "_"))
    return mask_in, pos_in, past, last


def _mask_and_positions(g, before, ids, mask_in, pos_in, pos_node, offset: int = 0):
    """RoPE or the position table reads position_ids (+ the graph's offset) instead of counting
    from 0; returns the mask [B, 1, S, T] (key j
    visible to query i when j <= P + i and attention_mask[b, j], or j == P + i) and the new and
    total lengths (S, T), the only lengths positions may be counted over."""
    with g.inserting_before(before):
        # positions: [B, S] with as many trailing unit dims as the captured position tensor had
        p = _call(g, aten.add.Tensor, pos_in, offset) if offset else pos_in
        for _ in range(len(_type(pos_node)[1]) - 2 if pos_node is not None else 0):
            p = _call(g, aten.unsqueeze.default, p, -1)
        s = _call(g, aten.sym_size.int, ids, 1)
        t = _call(g, aten.sym_size.int, mask_in, 1)
        off = _call(g, operator.sub, t, s)
        kpos = _call(g, aten.arange.default, t)
        qpos = _call(g, aten.add.Tensor, _call(g, aten.arange.default, s), off)
        qcol = _call(g, aten.unsqueeze.default, qpos, 1)
        causal = _call(g, aten.le.Tensor, kpos, qcol)
        diag = _call(g, aten.eq.Tensor, kpos, qcol)
        pad = _call(g, aten.ne.Scalar, mask_in, 0)
        pad = _call(g, aten.unsqueeze.default, _call(g, aten.unsqueeze.default, pad, 1), 2)
        mask = _call(g, aten.logical_or.default, _call(g, aten.logical_and.default, causal, pad), diag)
    if pos_node is not None:
        pos_node.replace_all_uses_with(p)
    return mask, (s, t)


def _attend_over_cache(g, a, i: int, kv, past: dict, mask, alibi=None) -> list[fx.Node]:
    """Attention `a` reads the past keys and values concatenated with the new ones (dequantized,
    when the cache holds codes), under the decoder's mask (with ALiBi: the bias where the mask
    allows, the lowest float elsewhere); returns the present cache tensors."""
    sdpa, presents, new_kv = a.sdpa, [], []
    if alibi is not None:
        with g.inserting_before(sdpa):
            mask = _call(g, aten.masked_fill.Scalar, alibi, _call(g, aten.logical_not.default, mask),
                         torch.finfo(torch.float32).min)
    for kind, (src, qargs) in zip(("key", "value"), kv):
        name = f"{i}.{kind}"
        with g.inserting_before(sdpa):
            if qargs:   # cache the codes; attend over their dequantized values
                parts = _call(g, _KV_Q, src, *qargs)
                cat = [_call(g, aten.cat.default, [past[name + sfx], _call(g, operator.getitem, parts, k)], 2)
                       for k, sfx in enumerate(("", "_scale", "_zero"))]
                presents += cat
                total = _call(g, _KV_DQ, *cat, qargs[0])
            else:
                total = _call(g, aten.cat.default, [past[name], src], 2)
                presents.append(total)
        new_kv.append(total)
    args = list(sdpa.args)
    args[1:3] = new_kv
    if len(args) > 3:
        args[3] = mask
    kwargs = dict(sdpa.kwargs)
    if len(args) <= 3:
        kwargs["attn_mask"] = mask
    kwargs["is_causal"] = False
    if len(args) > 5:   # positional is_causal
        args[5] = False
        kwargs.pop("is_causal")
    if a.n_heads != int(_type(kv[0][0])[1][1]):   # the attention op reads kv_heads heads: no copy of the cache per head
        kwargs["enable_gqa"] = True
    sdpa.args, sdpa.kwargs = tuple(args), kwargs
    return presents
