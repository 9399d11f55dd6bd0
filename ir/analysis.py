"""Structural analysis of a captured decoder, from the graph alone (no module names).

Found: the embedding and the residual stream (embedding -> residual adds -> final norm ->
lm_head); every RMSNorm (plain, or with the +1 offset of Gemma) with the linears it feeds;
attention blocks (q/k/v/o linears, fused qkv, heads, kv heads, head_dim, q/k norms, the nodes
where RoPE is applied); MLP blocks (gate/up/down, fused gate_up, activation).
Linears are `aten.linear` nodes whose weight is a parameter or a weight format's op over packed
tensors (ir/formats), optionally plus an additive format's (sparse outliers). A structure that does not fit raises StructureError naming the node."""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

from . import experts, formats, hadamard, meta, quant
from .errors import StructureError

aten = torch.ops.aten

GROUPED = experts.grouped_linear._opoverload   # an MoE layer's experts, one node (ir/experts.py)
ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu", aten.relu.default: "relu",
               aten.gelu_.default: "gelu", aten.silu_.default: "silu"}


@dataclass
class Linear:
    node: fx.Node
    weight: str            # get_attr target of the weight (of qweight once quantized)
    bias: str | None
    module: str | None
    in_features: int
    out_features: int
    quantized: bool
    weight_node: fx.Node     # get_attr of the weight, or the dequantize node that makes it
    sparse: tuple[str, str, str] | None = None   # CSR (crow, col, val) targets added to the weight
    home: str = ""           # where tensors derived from this linear's weight live: its module path,
    #                          or its weight's own path where several linears share a module
    experts: int = 0         # a stack of this many experts' weights (lowbit.grouped_linear, ir/experts.py):
    #                          out_features and in_features are each expert's

    @property
    def name(self) -> str:
        return self.module or self.node.name

    @property
    def path(self) -> str:
        """Its module path without a leading `model.` (layers.3.mlp.down_proj, lm_head): what `only=` matches."""
        from .graph import short_name
        return short_name(self.name)

    @property
    def rows(self) -> int:
        """Rows of the weight as one matrix (an expert stack's rows stacked)."""
        return self.out_features * max(self.experts, 1)

    @property
    def frozen(self) -> bool:
        """The weight is no longer one plain parameter (quantized or split into dense + sparse)."""
        return self.quantized or self.sparse is not None


@dataclass
class Norm:
    input: fx.Node         # what is normalized
    normalized: fx.Node    # x * rsqrt(mean(x^2) + eps); for a LayerNorm, the layer_norm node itself
    output: fx.Node        # normalized, or normalized * scale (+ shift)
    weight: str | None     # get_attr target of the scale (None once folded)
    offset: float          # scale = weight + offset (Gemma: 1.0)
    eps: float
    consumers: list[Linear] = field(default_factory=list)  # linears reading output (maybe through lowbit.quantize_tokens)
    other_users: list[fx.Node] = field(default_factory=list)
    bias: str | None = None   # get_attr target of a LayerNorm's shift
    kind: str = "rms"         # "rms": x / rms(x); "layer": (x - mean(x)) / std(x) (aten.layer_norm);
                              # "none": no pre-norm, the block reads the stream value itself

    @property
    def name(self) -> str:
        return self.weight or self.normalized.name

    @property
    def path(self) -> str:
        """Its name as `only=` matches it, like a linear's path: without the capture wrapper's
        prefix nor the model's own leading `model.` (layers.3.input_layernorm.weight)."""
        from .graph import short_name
        return short_name(short_name(self.name))


@dataclass
class Attention:
    sdpa: fx.Node
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_q: fx.Node | None    # node producing whole-head q after RoPE (without RoPE: q in heads)
    rope_k: fx.Node | None
    q_norm: Norm | None
    k_norm: Norm | None
    v_rows: torch.Tensor      # rows of v's weight that produce the values, head by head (a part of a fused qkv)

    @property
    def fused_qkv(self) -> bool:
        return self.q.node is self.k.node


@dataclass
class MLP:
    up: Linear
    gate: Linear | None
    down: Linear
    act: str
    router: Linear | None = None   # mixture of experts: the linear scoring experts (up, gate, down: expert stacks)

    @property
    def fused_gate_up(self) -> bool:
        return self.gate is not None and self.gate.node is self.up.node


@dataclass
class Block:
    """One residual branch: stream -> norm -> (attention | mlp) [-> post-norm] -> add back into the stream."""
    norm: Norm
    add: fx.Node
    attention: Attention | None = None
    mlp: MLP | None = None
    post_norm: Norm | None = None   # a norm on the branch's output before the add (Gemma3, OLMo2)


@dataclass
class Structure:
    embedding: fx.Node
    embedding_weight: str
    stream: list[fx.Node]        # residual stream values: embedding output, then each residual add
    blocks: list[Block]
    final_norm: Norm
    lm_head: Linear
    norms: list[Norm]
    linears: dict[str, Linear]   # by node name
    tied_embedding: bool         # lm_head reads the embedding's tensor
    positions: fx.Node | None = None   # learned position embeddings added to the token embedding
    embedding_norm: Norm | None = None  # a norm right after the embedding, whose output is the stream

    @property
    def attentions(self) -> list[Attention]:
        return [b.attention for b in self.blocks if b.attention]

    @property
    def mlps(self) -> list[MLP]:
        return [b.mlp for b in self.blocks if b.mlp]

    def summary(self) -> dict:
        att = self.attentions
        return {
            "layers": len(att), "residual_adds": len({b.add for b in self.blocks}), "norms": len(self.norms),
            "linears": len(self.linears), "tied_embedding": self.tied_embedding,
            "heads": att[0].n_heads if att else 0, "kv_heads": att[0].n_kv_heads if att else 0,
            "head_dim": att[0].head_dim if att else 0,
            "fused_qkv": any(a.fused_qkv for a in att), "qk_norm": any(a.q_norm for a in att),
            "fused_gate_up": any(m.fused_gate_up for m in self.mlps),
            "activation": self.mlps[0].act if self.mlps else None,
        }


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def node_shape(n: fx.Node):
    """Shape from export's fake tensor, else from the type string passes and artifacts carry
    ('f32[batch,4,seq,16]' -> ('batch', 4, 'seq', 16))."""
    v = n.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    typ = n.meta.get(meta.TYPE, "")
    if "[" not in typ or typ.startswith("("):
        return None
    dims = typ[typ.index("[") + 1:-1]
    return tuple(int(d) if d.isdigit() else d for d in dims.split(",")) if dims else ()


def _linear(n: fx.Node, ir) -> Linear:
    w = n.args[1]
    grouped = _is(n, GROUPED)
    bias = None if grouped else n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    sparse = None
    if _is(w, *formats.ADDITIVE_OPS):
        sparse = tuple(a.target for a in w.args[1:4])
        w = w.args[0]
    quantized = _is(w, *formats.DENSE_OPS)
    if quantized:
        qweight, k = w.args[0], w.args[-1]
        out_f = ir.placeholder(qweight.target).shape[0]
        wname = qweight.target
    elif isinstance(w, fx.Node) and w.op == "get_attr":
        out_f, k = ir.placeholder(w.target).shape[-2:]
        wname = w.target
    else:
        raise StructureError(n, "a linear whose weight is a parameter or a lowbit.dequantize of one "
                                "(plus optional sparse outliers)")
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        raise StructureError(n, "a linear whose bias is a parameter")
    experts = int((node_shape(n.args[2]) or (0,))[0]) if grouped else 0
    if grouped and (quantized or ir.placeholder(wname).dim() == 2):   # the experts' rows stacked
        out_f //= experts
    return Linear(n, wname, bias.target if bias is not None else None, n.meta.get(meta.MODULE),
                  int(k), int(out_f), quantized, w, sparse, experts=experts)


def _norm_at(rsqrt: fx.Node) -> Norm:
    """Match x * rsqrt(mean(x^2, -1) + eps) [* (w [+ c])] around an rsqrt node."""
    add = rsqrt.args[0]
    if not (_is(add, aten.add.Tensor, aten.add.Scalar) and isinstance(add.args[1], (int, float))):
        raise StructureError(rsqrt, "rsqrt(mean(x^2) + eps) of an RMSNorm")
    mean = add.args[0]
    if not (_is(mean, aten.mean.dim) and _is(mean.args[0], aten.pow.Tensor_Scalar) and mean.args[0].args[1] == 2):
        raise StructureError(add, "mean(pow(x, 2), -1) of an RMSNorm")
    x = mean.args[0].args[0]
    normalized = [u for u in rsqrt.users if _is(u, aten.mul.Tensor) and x in u.args]
    if len(normalized) != 1 or len(rsqrt.users) != 1:
        raise StructureError(rsqrt, "one x * rsqrt(...) user of the RMSNorm's rsqrt")
    normalized = normalized[0]
    weight, offset, output = None, 0.0, normalized
    if len(normalized.users) == 1:
        user = next(iter(normalized.users))
        if _is(user, aten.mul.Tensor):
            other = user.args[0] if user.args[1] is normalized else user.args[1]
            if isinstance(other, fx.Node) and other.op == "get_attr":
                weight, output = other.target, user
            elif (_is(other, aten.add.Tensor) and isinstance(other.args[0], fx.Node)
                  and other.args[0].op == "get_attr" and isinstance(other.args[1], (int, float))):
                weight, offset, output = other.args[0].target, float(other.args[1]), user
    return Norm(x, normalized, output, weight, offset, float(add.args[1]))


class _Graph:
    """networkx view of the fx graph for reachability questions."""

    def __init__(self, g: fx.Graph):
        self.g = nx.DiGraph()
        self.order = {n: i for i, n in enumerate(g.nodes)}
        for n in g.nodes:
            self.g.add_node(n)
            for inp in n.all_input_nodes:
                self.g.add_edge(inp, n)

    def depends(self, node: fx.Node, on: fx.Node) -> bool:
        return node is on or nx.has_path(self.g, on, node)

    def nearest(self, start: fx.Node, forward: bool, stop) -> list[fx.Node]:
        """Nodes satisfying `stop` first met walking from `start` (not crossing them)."""
        seen, found, todo = {start}, [], [start]
        while todo:
            n = todo.pop()
            nbrs = self.g.successors(n) if forward else self.g.predecessors(n)
            for m in nbrs:
                if m in seen or m.op in ("get_attr", "placeholder"):
                    continue
                seen.add(m)
                (found if stop(m) else todo).append(m)
        return sorted(found, key=lambda m: m.meta.get(meta.HANDLE, 0))


@dataclass
class Linears:
    """Every linear of a graph and the one that makes the logits: all that passes quantizing
    weights need, found without the rest of the structure (any captured causal LM has it)."""
    linears: dict[str, Linear]          # by node name
    lm_head: Linear | None
    skipped: dict[str, str] = field(default_factory=dict)   # node name -> why it is not a Linear


def find_linears(ir, strict: bool = False) -> Linears:
    """The graph's linears; a linear whose weight is not a stored tensor (or a weight format's op
    over stored tensors) is skipped with the reason, or, strict, refused."""
    g = ir.graph
    linears, skipped = {}, {}
    for n in g.nodes:
        if _is(n, aten.linear.default, GROUPED):
            try:
                linears[n.name] = _linear(n, ir)
            except StructureError as e:
                if strict:
                    raise
                skipped[n.name] = str(e)
    for n in g.nodes:   # stored matrices something other than a linear or an embedding multiplies (MoE experts)
        if n.op == "get_attr" and ir.placeholder(n.target).is_floating_point() and ir.placeholder(n.target).dim() >= 2:
            for u in n.users:
                if u.op == "call_function" and not _is(u, aten.linear.default, GROUPED, aten.embedding.default, *formats.DENSE_OPS,
                                                        *formats.ADDITIVE_OPS) and u.name not in skipped:
                    skipped[u.name] = f"{n.target} is read by {u.target}, not by a linear: left in float"
    shared = Counter(lin.module for lin in linears.values())
    for lin in linears.values():
        # beside the weight, not under it (a parameter holds no tensors): "a.b.w" -> "a.b_w"
        lin.home = lin.module if lin.module and shared[lin.module] == 1 else "_".join(lin.weight.rsplit(".", 1))
    out = next(n for n in g.nodes if n.op == "output")
    heads = _Graph(g).nearest(out, False, lambda m: m.name in linears or m.name in skipped)
    lm_head = linears.get(heads[0].name) if len(heads) == 1 else None
    return Linears(linears, lm_head, skipped)


def _layer_norm_at(n: fx.Node) -> Norm:
    """aten.layer_norm(x, shape, weight, bias, eps): the mean-subtracting norm (LayerNorm)."""
    w, b = (n.args[i] if len(n.args) > i else None for i in (2, 3))
    attr = lambda a: a.target if isinstance(a, fx.Node) and a.op == "get_attr" else None   # noqa: E731
    if (w is not None and attr(w) is None) or (b is not None and attr(b) is None):
        raise StructureError(n, "a layer_norm whose weight and bias are stored tensors")
    return Norm(n.args[0], n, n, attr(w), 0.0, float(n.args[4]) if len(n.args) > 4 else 1e-5, bias=attr(b), kind="layer")


def find_norms(ir, linears: dict[str, Linear], strict: bool = False) -> list[Norm]:
    """Every norm (RMSNorm written out, or aten.layer_norm) with the linears reading its output:
    what folding needs, found on any captured graph. An rsqrt that is not an RMSNorm is passed
    over, or, strict, refused."""
    norms = []
    for n in ir.graph.nodes:
        try:
            if _is(n, aten.rsqrt.default):
                norms.append(_norm_at(n))
            elif _is(n, aten.layer_norm.default):
                norms.append(_layer_norm_at(n))
        except StructureError:
            if strict:
                raise
    for norm in norms:
        _find_readers(norm, linears)
    return norms


def _find_readers(norm: Norm, linears: dict[str, Linear]):
    """The linears reading a norm's output (its consumers), and every other user. Looked through
    between a norm and its linears: an activation quantizer, views that keep the last dim and row
    gathers (an MoE's tokens routed to experts): they regroup rows, and a per-channel scale or a
    rotation of the last dim commutes with them; and shape-noise's online matrix (lowbit.rotate_kron),
    which comes after every pass that moves a scale or a rotation through a norm."""
    width = (node_shape(norm.output) or (0,))[-1]

    def regroups(u, x):
        return u.args[0] is x and (_is(u, quant.quantize_tokens._opoverload, hadamard.rotate_kron._opoverload) or (
            _is(u, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
            and (node_shape(u) or (None,))[-1] == width)
            or _is(u, aten.index.Tensor) and len(u.args[1]) == 1 and len(node_shape(x) or ()) == 2)

    todo = [norm.output]
    while todo:
        x = todo.pop()
        for u in x.users:
            if regroups(u, x):
                todo.append(u)
            elif u.name in linears and u.args[0] is x:
                norm.consumers.append(linears[u.name])
            else:
                norm.other_users.append(u)


def analyze(ir) -> Structure:
    g = ir.graph
    G = _Graph(g)
    linears = find_linears(ir, strict=True).linears
    norms = find_norms(ir, linears, strict=True)
    norm_by_input = {}
    for norm in norms:
        norm_by_input.setdefault(norm.input, []).append(norm)

    emb, cur, positions, emb_norm = _stream_start(g, G, norm_by_input)
    stream, blocks = [cur], []
    while True:
        while len(cur.users) == 1 and _is(next(iter(cur.users)), aten.view.default, aten.reshape.default) \
                and (node_shape(next(iter(cur.users))) or (None,))[-1] == (node_shape(cur) or (0,))[-1]:
            cur = next(iter(cur.users))   # the stream regrouped into rows and back (OPT)
            stream.append(cur)
        adds = [u for u in cur.users if _is(u, aten.add.Tensor)
                and all(isinstance(a, fx.Node) for a in u.args[:2])
                and G.depends(u.args[1] if u.args[0] is cur else u.args[0], cur)]
        if not adds:
            break
        if len(adds) > 1:
            raise StructureError(cur, "one residual add reading each residual-stream value")
        add = adds[0]
        branch_out = add.args[1] if add.args[0] is cur else add.args[0]
        pre = norm_by_input.get(cur, [])
        if not pre:   # no pre-norm (OLMo2): the branches' linears read the stream itself
            pre = [Norm(cur, cur, cur, None, 0.0, 0.0, kind="none")]
            _find_readers(pre[0], linears)
        for part in _branches(branch_out, cur, G):   # one, or several summed in parallel (GPT-NeoX, Falcon)
            norm = [n for n in pre if G.depends(part, n.output)]
            if len(norm) != 1:
                raise StructureError(cur, f"one pre-norm reading the residual stream before '{add.name}', "
                                          f"found {len(norm)}")
            blocks.append(_block(ir, norm[0], add, part, G, linears, norms))
        cur = add
        stream.append(cur)
    final = norm_by_input.get(cur, [])
    if len(final) != 1:
        raise StructureError(cur, "a final norm reading the end of the residual stream")
    heads = G.nearest(final[0].output, True, lambda m: m.name in linears)
    if len(heads) != 1:
        raise StructureError(final[0].output, "one lm_head linear after the final norm")
    lm_head = linears[heads[0].name]
    emb_w = emb.args[0].target
    return Structure(emb, emb_w, stream, blocks, final[0], lm_head, norms, linears,
                     tied_embedding=lm_head.weight == emb_w, positions=positions, embedding_norm=emb_norm)


def _stream_start(g, G, norm_by_input):
    """(the token embedding lookup, the residual stream's first value, learned positions or None,
    the embedding's norm or None): the lookup, an elementwise scale by something not derived from
    the tokens (Gemma), then learned absolute positions added to it (GPT-2, OPT) or a norm whose
    output the blocks' norms read (BLOOM)."""
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    embeds = [n for n in g.nodes if _is(n, aten.embedding.default) and _through_layout(n.args[1]) in inputs]
    if len(embeds) != 1:
        raise StructureError(inputs[0] if inputs else "input", f"one embedding lookup of input_ids, found {len(embeds)}")
    emb = cur = embeds[0]
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        other = [a for a in u.args if isinstance(a, fx.Node) and a is not cur]
        if _is(u, aten.mul.Tensor) and all(not G.depends(o, inputs[0]) for o in other):
            cur = u
        else:
            break
    norm = norm_by_input.get(cur, [])
    if len(norm) == 1 and norm_by_input.get(norm[0].output) and not norm[0].consumers:
        return emb, norm[0].output, None, norm[0]   # a norm right after the embedding (BLOOM): the stream is its output
    if len(cur.users) == 1 and not norm_by_input.get(cur):
        u = next(iter(cur.users))
        other = [a for a in u.args[:2] if isinstance(a, fx.Node) and a is not cur]
        if _is(u, aten.add.Tensor) and len(other) == 1 and not G.depends(other[0], emb):
            return emb, u, other[0], None
    return emb, cur, None, None


def _through_layout(n):
    """n, or what it reshapes (view, reshape, unsqueeze): where an index tensor comes from."""
    while _is(n, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default):
        n = n.args[0]
    return n


def _branches(out: fx.Node, cur: fx.Node, G) -> list[fx.Node]:
    """A residual branch's output, split where it is a sum of branches that each read the stream:
    parallel attention and MLP (x + attn(ln1(x)) + mlp(ln2(x))), routed and shared experts."""
    inner = out
    while _is(inner, aten.view.default, aten.reshape.default) and \
            (node_shape(inner) or (None,))[-1] == (node_shape(inner.args[0]) or (0,))[-1]:
        inner = inner.args[0]   # a sum taken on rows, then viewed back (routed and shared experts)
    if _is(inner, aten.add.Tensor) and all(isinstance(a, fx.Node) and G.depends(a, cur) for a in inner.args[:2]):
        return _branches(inner.args[0], cur, G) + _branches(inner.args[1], cur, G)
    return [out]


def _one_linear(G, start, linears, what) -> Linear:
    found = G.nearest(start, False, lambda m: m.name in linears)
    if len(found) != 1:
        raise StructureError(start, f"one {what} linear feeding it, found {len(found)}")
    return linears[found[0].name]


def _rope(G, lin: Linear, end: fx.Node, head_dim: int) -> fx.Node | None:
    """Where q or k is whole heads after RoPE (R3's place): the last `add` between a projection and the attention input
    whose ancestors contain rotate_half (neg -> cat), followed forward to the first node holding
    whole heads (partial rotary concatenates the unrotated part after it)."""
    between = nx.descendants(G.g, lin.node) & (nx.ancestors(G.g, end) | {end})
    ropes = [n for n in between if _is(n, aten.add.Tensor)
             and any(_is(a, aten.neg.default) for a in nx.ancestors(G.g, n) & between)]
    if not ropes:   # no RoPE (learned positions, ALiBi): the first [batch, heads, seq, head_dim] value
        heads = [n for n in sorted(between, key=G.order.get) if len(sh := node_shape(n) or ()) == 4
                 and sh[-1] == head_dim and isinstance(sh[1], int) and not isinstance(sh[2], int)]
        return heads[0] if heads else None
    cur = max(ropes, key=lambda n: n.meta.get(meta.HANDLE, 0))
    while (node_shape(cur) or (0,))[-1] != head_dim:
        nxt = [u for u in cur.users if u in between]
        if len(nxt) != 1:
            raise StructureError(cur, "one path from RoPE to the attention input")
        cur = nxt[0]
    return cur


def _block(ir, norm, add, branch_out, G, linears, norms) -> Block:
    inside = nx.descendants(G.g, norm.output) & nx.ancestors(G.g, branch_out)
    sdpas = [n for n in inside if _is(n, aten.scaled_dot_product_attention.default)]
    if len(sdpas) > 1:
        raise StructureError(add, "at most one attention inside a residual branch")
    post = next((n for n in norms if n.output is branch_out), None)
    if sdpas:
        return Block(norm, add, attention=_attention(ir, sdpas[0], G, linears, norms), post_norm=post)
    return Block(norm, add, mlp=_mlp(norm, branch_out, G, linears), post_norm=post)


def _attention(ir, sdpa, G, linears, norms) -> Attention:
    q_in, k_in, v_in = sdpa.args[:3]
    q, k, v = (_one_linear(G, x, linears, w) for x, w in ((q_in, "q"), (k_in, "k"), (v_in, "v")))
    outs = G.nearest(sdpa, True, lambda m: m.name in linears)
    if len(outs) != 1:
        raise StructureError(sdpa, "one output projection after attention")
    qs = node_shape(q_in)
    if not qs or len(qs) != 4:
        raise StructureError(q_in, "a [batch, heads, seq, head_dim] query")
    n_heads, head_dim = int(qs[1]), int(qs[3])
    k_rows, v_rows = _head_rows(ir, G, k, k_in, head_dim), _head_rows(ir, G, v, v_in, head_dim)
    if len(k_rows) != len(v_rows) or len(v_rows) % head_dim:
        raise StructureError(k.node, f"keys and values of whole heads (head_dim {head_dim}), found "
                                     f"{len(k_rows)} and {len(v_rows)} rows")
    def qk_norm(lin, end):
        return next((nm for nm in norms if G.depends(nm.input, lin.node) and G.depends(end, nm.output)), None)

    return Attention(sdpa, q, k, v, linears[outs[0].name], n_heads, len(v_rows) // head_dim, head_dim,
                     _rope(G, q, q_in, head_dim), _rope(G, k, k_in, head_dim), qk_norm(q, q_in), qk_norm(k, k_in),
                     v_rows)


# ops that only move values around: what carries row indices from a projection to its heads
LAYOUT_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
              aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
              aten.broadcast_to.default, aten.slice.Tensor, aten.select.int, aten.split.Tensor,
              aten.split_with_sizes.default, aten.chunk.default, aten.flatten.using_ints, aten.index.Tensor,
              aten.clone.default, aten.contiguous.default, aten.lift_fresh_copy.default, operator.getitem}


def _head_rows(ir, G, lin: Linear, end: fx.Node, head_dim: int) -> torch.Tensor:
    """The output rows of `lin` that reach `end` as whole heads, head by head: the row numbers
    themselves are carried through the layout ops between them (views, transposes, slices, splits,
    chunks, index selects and broadcasts; batch and sequence of size 1), so a fused projection in
    any layout (blocks of q, k and v; GPT-2's split; q/k/v interleaved per head, GPT-NeoX's and
    Falcon's) reads the same. Where other ops begin (RoPE on the keys), the last value holding
    whole heads counts; where they begin before any (a norm over all of k), an unfused projection
    gives all its rows. A head repeated for grouped queries counts once."""
    between = (nx.descendants(G.g, lin.node) & nx.ancestors(G.g, end)) | {end}
    shape = [d if isinstance(d, int) else 1 for d in node_shape(lin.node) or (lin.out_features,)]
    vals = {lin.node: torch.arange(shape[-1]).expand(shape)}

    def value(a):
        if a in vals:
            return vals[a]
        if isinstance(a.meta.get("val"), torch.SymInt):
            return 1
        if a.op == "get_attr":
            return ir.tensor(a.target)
        if a.target is aten.lift_fresh_copy.default:
            return value(a.args[0])
        raise KeyError(a)
    last = None
    for n in sorted(between, key=G.order.get):
        if n.target not in LAYOUT_OPS:
            continue
        try:
            vals[n] = n.target(*fx.node.map_arg(n.args, value), **fx.node.map_arg(n.kwargs, value))
        except (KeyError, RuntimeError, TypeError, IndexError):
            continue
        if isinstance(vals[n], torch.Tensor) and vals[n].shape[-1] == head_dim:
            last = vals[n]
    found = vals.get(end, last)
    if found is None and all(G.depends(end, u) for u in lin.node.users):   # not fused, other ops first (OLMo2's k norm)
        return torch.arange(lin.out_features)
    if not isinstance(found, torch.Tensor) or found.shape[-1] != head_dim:
        raise StructureError(lin.node, f"whole heads of {head_dim} values from '{lin.name}' reaching the attention")
    return torch.tensor(list(dict.fromkeys(found.flatten().tolist())))


def _mlp(norm, branch_out, G, linears) -> MLP:
    if branch_out.name in linears:
        down = linears[branch_out.name]
    else:   # the linear writing the stream's width (an MoE's router, read through the routing weights, does not)
        found = G.nearest(branch_out, False, lambda m: m.name in linears)
        found = [m for m in found if len(found) == 1 or linears[m.name].out_features == (node_shape(branch_out) or (0,))[-1]]
        if len(found) != 1:
            raise StructureError(branch_out, f"one MLP down linear feeding it, found {len(found)}")
        down = linears[found[0].name]
    inside = nx.descendants(G.g, norm.output) & nx.ancestors(G.g, down.node)
    ins = [c for c in norm.consumers if c.node in inside]   # a norm shared with a parallel attention feeds q/k/v too
    router = None
    if down.experts:   # routed experts: the one plain linear reading the pre-norm picks them
        routers = [c for c in ins if not c.experts]
        if len(routers) != 1:
            raise StructureError(down.node, f"one router linear beside the experts, found {len(routers)}")
        router, ins = routers[0], [c for c in ins if c.experts]
        inside = {n for n in inside if any(G.depends(n, c.node) for c in ins)}
    if not ins:
        raise StructureError(norm.output, "linears reading the MLP's pre-norm")
    soft = [n for n in inside if _is(n, aten.softmax.int, aten._softmax.default)]
    if soft:   # attention the capture could not make one op of: not an MLP
        raise StructureError(soft[0], "attention as one scaled_dot_product_attention, not a softmax between matmuls")
    acts = [n for n in inside if n.op == "call_function" and n.target in ACTIVATIONS]
    if not acts and len(ins) == 1:   # one input projection, its activation spelled out (GPT-2's tanh GELU)
        return MLP(up=ins[0], gate=None, down=down, act="elementwise", router=router)
    if len(acts) != 1:
        raise StructureError(down.node, f"one activation inside the MLP, found {len(acts)}")
    act = acts[0]
    if len(ins) == 1:
        fused = ins[0]
        has_mul = any(_is(n, aten.mul.Tensor) for n in nx.descendants(G.g, fused.node)
                      if G.depends(down.node, n))
        return MLP(up=fused, gate=fused if has_mul else None, down=down, act=ACTIVATIONS[act.target], router=router)
    if len(ins) != 2:
        raise StructureError(norm.output, f"one or two linears (gate, up) reading the MLP's pre-norm, found {len(ins)}")
    gate = [lin for lin in ins if G.depends(act, lin.node)]
    if len(gate) != 1:
        raise StructureError(act, "an activation applied to exactly one of the MLP's input projections")
    up = next(lin for lin in ins if lin is not gate[0])
    return MLP(up=up, gate=gate[0], down=down, act=ACTIVATIONS[act.target], router=router)
