"""Capture a causal LM into the IR with torch.export (non-strict), before any decomposition.

The captured forward takes input_ids [batch, seq] and returns logits [batch, seq, vocab], with no
KV cache; batch and sequence length are dynamic. After export the graph is canonicalized: guard
and metadata-assert nodes are dropped, and ops that are the identity here (same-dtype casts,
aliases, zero dropout, contiguous) are bypassed, so analyses see the arithmetic only."""
from __future__ import annotations

import contextlib
import re

import torch
import torch.fx as fx

from . import experts, meta
from .errors import LowbitError
from .graph import IR, ModelInfo, short_name, type_string, upstream

aten = torch.ops.aten


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if hasattr(out, "logits") else out


_IDENTITY_IF_SAME_TYPE = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
                          aten.type_as.default, aten.alias.default, aten.contiguous.default,
                          aten.clone.default}
_DROP = {aten._assert_tensor_metadata.default}


def _is_identity(n: fx.Node) -> bool:
    if n.op != "call_function":
        return False
    if n.target is aten.dropout.default:
        return n.args[1] == 0.0 or n.args[2] is False
    if n.target not in _IDENTITY_IF_SAME_TYPE:
        return False
    src, out = n.args[0], n.meta.get("val")
    if not isinstance(src, fx.Node) or not isinstance(out, torch.Tensor):
        return False
    inp = src.meta.get("val")
    return isinstance(inp, torch.Tensor) and inp.dtype == out.dtype and inp.device == out.device


def _as_linear(g: fx.Graph, out: fx.Node, mm: fx.Node, args: tuple, dead: tuple):
    """linear(*args) in place of `out` (with mm's module path and out's value), then the replaced
    nodes `dead` erased, users first."""
    with g.inserting_before(out):
        lin = g.call_function(aten.linear.default, args)
    lin.meta.update({k: v for k, v in mm.meta.items() if k == "nn_module_stack"})
    lin.meta["val"] = out.meta.get("val")
    out.replace_all_uses_with(lin)
    for n in dead:
        g.erase_node(n)


def _addmm_to_linear(gm: fx.GraphModule):
    """GPT-2's Conv1D, view(x, [-1, K]) -> addmm(b, ., W [K, N]) -> view(., [..., N]), becomes
    linear(x, W^T, b) with the weight stored transposed: one kind of linear for every pass."""
    g = gm.graph
    for mm in [n for n in g.nodes if n.op == "call_function" and n.target is aten.addmm.default]:
        bias, flat, w = mm.args[:3]
        out = next(iter(mm.users)) if len(mm.users) == 1 else None
        if (mm.kwargs or len(mm.args) != 3 or not all(isinstance(a, fx.Node) for a in (bias, flat, w))
                or w.op != "get_attr" or len(w.users) != 1 or bias.op != "get_attr"
                or flat.target not in (aten.view.default, aten.reshape.default)
                or out is None or out.target not in (aten.view.default, aten.reshape.default)):
            continue
        owner, leaf = gm, w.target
        if "." in leaf:
            path, leaf = leaf.rsplit(".", 1)
            owner = gm.get_submodule(path)
        t = getattr(owner, leaf)
        setattr(owner, leaf, torch.nn.Parameter(t.detach().t().contiguous(), requires_grad=False))
        gm.meta.setdefault(TRANSPOSED, set()).add(w.target)
        _as_linear(g, out, mm, (flat.args[0], w, bias), (out, mm) + ((flat,) if len(flat.users) == 1 else ()))


TRANSPOSED = "lowbit_transposed"   # gm.meta key: the weights capture stored transposed

_TRANSPOSES = {aten.numpy_T.default, aten.t.default, aten.transpose.int, aten.permute.default}


def _matmul_to_linear(gm: fx.GraphModule):
    """x @ W.T (+ b) with W a stored matrix (Falcon's linears) becomes linear(x, W, b)."""
    g = gm.graph
    for mm in [n for n in g.nodes if n.op == "call_function" and n.target is aten.matmul.default]:
        x, wt = mm.args
        if not (isinstance(wt, fx.Node) and wt.target in _TRANSPOSES and len(wt.users) == 1):
            continue
        w = wt.args[0]
        if not (w.op == "get_attr" and getattr(_attr(gm, w.target), "dim", lambda: 0)() == 2
                and (wt.target is not aten.transpose.int or sorted(a % 2 for a in wt.args[1:]) == [0, 1])
                and (wt.target is not aten.permute.default or list(wt.args[1]) == [1, 0])):
            continue
        out, bias = mm, None
        add = next(iter(mm.users)) if len(mm.users) == 1 else None
        if add is not None and add.target is aten.add.Tensor and len(add.args) == 2 and not add.kwargs:
            other = add.args[1] if add.args[0] is mm else add.args[0]
            if isinstance(other, fx.Node) and other.op == "get_attr" and _attr(gm, other.target).dim() == 1:
                out, bias = add, other
        _as_linear(g, out, mm, (x, w) + ((bias,) if bias is not None else ()),
                   (out, mm, wt) if out is not mm else (mm, wt))


_FUNCTIONAL = {aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
               aten.mul_.Tensor: aten.mul.Tensor, aten.div_.Tensor: aten.div.Tensor,
               aten.index_put_.default: aten.index_put.default}


def _grouped_to_linear(gm: fx.GraphModule):
    """A grouped matmul over transposed stored expert weights, (x, W [E, N, K]^T, offsets), becomes
    lowbit.grouped_linear(x, W, offsets): the experts in a linear's layout (ir/experts.py). The
    inverse routing permutation, index_put_ into empty_like, is made into zeros_like + index_put."""
    g = gm.graph
    for n in [n for n in g.nodes if n.op == "call_function" and n.target in experts.grouped_ops()]:
        x, wt, offs = n.args[:3]
        if (len(n.args) == 3 and not n.kwargs and isinstance(wt, fx.Node) and wt.target is aten.transpose.int
                and len(wt.users) == 1 and sorted(a % 3 for a in wt.args[1:]) == [1, 2]
                and wt.args[0].op == "get_attr" and _attr(gm, wt.args[0].target).dim() == 3):
            n.target, n.args = torch.ops.lowbit.grouped_linear.default, (x, wt.args[0], offs)
            g.erase_node(wt)
    for n in [n for n in g.nodes if n.op == "call_function" and n.target is aten.empty_like.default]:
        if n.users and all(u.target is aten.index_put_.default and u.args[0] is n for u in n.users):
            n.target = aten.zeros_like.default


_MATMULS = {aten.bmm.default, aten.matmul.default, aten.baddbmm.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _heads(n):
    """The [batch, heads, seq, dim] tensor a [batch*heads, seq, dim] one was reshaped from (or n)."""
    if n.target in _RESHAPES and n.args[0].meta["val"].dim() == 4 and n.meta["val"].dim() == 3:
        return n.args[0]
    return n if n.meta["val"].dim() == 4 else None


def _eager_attention_to_sdpa(g: fx.Graph):
    """Attention spelled out in matmuls (BLOOM, MPT): softmax(c * (q k^T) + masks) v, with the
    scores in [batch*heads, ...] or [batch, heads, ...], becomes one scaled_dot_product_attention
    whose attn_mask sums the masks (baddbmm's bias, ALiBi, included), each times the scale applied
    after it; the analysis and the decoder then read it as any attention."""
    from torch._guards import detect_fake_mode
    for sm in [n for n in g.nodes if n.op == "call_function" and n.target is aten.softmax.int and n.args[1] in (-1, 3)]:
        coef, masks, x = 1.0, [], sm.args[0]
        while True:   # back from the softmax to the q k^T product
            if x.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in x.args[:2]):
                inner = [a for a in x.args[:2] if any(m.target in _MATMULS for m in upstream(a, _MATMULS))]
                if len(inner) != 1:
                    break
                masks.append((coef, next(a for a in x.args[:2] if a is not inner[0])))
                x = inner[0]
            elif x.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
                coef = coef * x.args[1] if x.target is aten.mul.Tensor else coef / x.args[1]
                x = x.args[0]
            elif x.target in _RESHAPES:
                x = x.args[0]
            else:
                break
        if x.target not in _MATMULS or len(sm.users) != 1:
            continue
        bias, (q, kt), alpha = None, x.args[-2:], 1.0
        if x.target is aten.baddbmm.default:
            if x.kwargs.get("beta", 1) != 1:
                continue
            bias, alpha = x.args[0], x.kwargs.get("alpha", 1)
        y = next(iter(sm.users))
        while y.target in _RESHAPES and len(y.users) == 1:
            y = next(iter(y.users))
        if y.target not in (aten.bmm.default, aten.matmul.default) or y.args[0] not in (sm, *sm.users):
            continue
        out = next(iter(y.users)) if y.meta["val"].dim() == 3 and len(y.users) == 1 else y
        k = kt.args[0] if kt.target is aten.transpose.int and sorted(d % kt.meta["val"].dim() for d in kt.args[1:]) == \
            [kt.meta["val"].dim() - 2, kt.meta["val"].dim() - 1] else None
        q4, k4, v4 = _heads(q), k is not None and _heads(k), _heads(y.args[1])
        if not (q4 is not None and k4 is not None and v4 is not None and out.meta["val"].dim() == 4):
            continue
        fake = detect_fake_mode([q4.meta["val"]])
        heads = q4.meta["val"].shape[1]
        with g.inserting_before(out):
            terms = []
            if bias is not None:   # baddbmm's [batch*heads, ., keys] bias: a per-head mask, times what scales it later
                b4 = g.call_function(aten.unflatten.int, (bias, 0, [-1, heads]))
                terms.append((coef, b4))
            terms += masks
            total = None
            for c, m in terms:
                m = m if c == 1 else g.call_function(aten.mul.Tensor, (m, c))
                total = m if total is None else g.call_function(aten.add.Tensor, (total, m))
            sdpa = g.call_function(aten.scaled_dot_product_attention.default, (q4, k4, v4, total),
                                   {"scale": float(coef * alpha)})
        with fake:
            for n in [*(t[1] for t in terms), total, sdpa]:
                if n is not None and "val" not in n.meta:
                    n.meta["val"] = n.target(*fx.node.map_arg(n.args, lambda a: a.meta["val"]), **n.kwargs)
        out.replace_all_uses_with(sdpa)
    g.eliminate_dead_code()


def _inplace_to_functional(g: fx.Graph):
    """a.add_(b) -> add(a, b) where nothing reads a after it (Falcon's mlp_output += attention):
    the same values, and an add the analysis can see."""
    order = {n: i for i, n in enumerate(g.nodes)}
    for n in list(g.nodes):
        if n.op == "call_function" and n.target in _FUNCTIONAL and isinstance(n.args[0], fx.Node) \
                and n.args[0].op == "call_function" and all(order[u] <= order[n] for u in n.args[0].users):
            n.target = _FUNCTIONAL[n.target]


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    g = gm.graph
    _addmm_to_linear(gm)
    _matmul_to_linear(gm)
    _grouped_to_linear(gm)
    _inplace_to_functional(g)
    for n in list(g.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" or n.op == "call_function" and n.target in _DROP:
            g.erase_node(n)
        elif _is_identity(n):
            n.replace_all_uses_with(n.args[0])
            g.erase_node(n)
    _eager_attention_to_sdpa(g)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # Plain calling convention: forward(input_ids) -> logits (torch.export emits pytree codegen).
    g.set_codegen(fx.graph.CodeGen())
    out = next(n for n in g.nodes if n.op == "output")
    res = out.args[0]
    while isinstance(res, (tuple, list)) and len(res) == 1:
        res = res[0]
    out.args = (res,)
    g.eliminate_dead_code()
    g.lint()
    gm.recompile()
    return gm


def _module_path(n: fx.Node) -> str | None:
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return short_name(path.replace("L['self'].", "").replace("L__self__.", ""))


def annotate(gm: fx.GraphModule):
    """Debug handles, module paths of linears/embeddings, type strings (symbolic sizes named
    batch/seq); drop export's bulky meta."""
    ids = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"]
    names = {str(ids.shape[0]): "batch", str(ids.shape[1]): "seq"}
    sym = re.compile(r"\bs\d+\b")
    for i, n in enumerate(gm.graph.nodes):
        n.meta[meta.HANDLE] = i + 1
        n.meta[meta.TYPE] = sym.sub(lambda m: names.get(m.group(0), m.group(0)), type_string(n.meta.get("val")))
        if n.op == "call_function" and n.target in (aten.linear.default, aten.embedding.default):
            path = _module_path(n)
            if path:
                n.meta[meta.MODULE] = path
        if n.op == "call_function" and n.target is torch.ops.lowbit.grouped_linear.default:   # named by its weight
            n.meta[meta.MODULE] = short_name(n.args[1].target)
        if n.op == "get_attr":
            n.meta[meta.TYPE] = type_string(_attr(gm, n.target))
        for k in ("stack_trace", "from_node", "source_fn_stack", "torch_fn", "nn_module_stack"):
            n.meta.pop(k, None)


def _attr(gm, target):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj


def capture(model: torch.nn.Module, info: ModelInfo, tokenizer=None, example_len: int = 16,
            fake_mode=None) -> IR:
    """Export `model` (a transformers-style causal LM in eval mode) into the IR. `fake_mode`: the
    FakeTensorMode the model's parameters were made in, when they hold no data (ir/load.py binds
    them to the checkpoint's files afterwards)."""
    model = model.eval()
    wrapper = _LogitsOnly(model)
    vocab = info.vocab_size
    max_ctx = max(info.max_ctx, example_len + 1)
    example = torch.randint(0, vocab, (2, example_len))
    dims = {"input_ids": {0: torch.export.Dim("batch", min=1, max=1024),
                          1: torch.export.Dim("seq", min=1, max=max_ctx)}}
    try:
        with torch.no_grad(), fake_mode or contextlib.nullcontext():
            ep = torch.export.export(wrapper, (example,), dynamic_shapes=dims, strict=False)
    except Exception as e:  # export errors are long; keep the first line, it names the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LowbitError(f"torch.export could not capture {type(model).__name__}: {first}") from e
    gm = canonicalize(ep.module())
    annotate(gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    return IR(gm, info, tokenizer)
