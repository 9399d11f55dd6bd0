"""Stable, diffable text form of the IR: one line per node, in graph order."""
from __future__ import annotations

import torch
import torch.fx as fx

from . import meta
from .graph import short_name


def _target(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._schema.name.split('::')[1]}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, float):
        return repr(a)
    return str(a)


def format_node(n: fx.Node) -> str:
    typ = n.meta.get(meta.TYPE, "")
    head = f"%{n.name}" + (f" : {typ}" if typ else "")
    if n.op == "placeholder":
        body = "input"
    elif n.op == "get_attr":
        body = f"param {short_name(n.target)}"
    elif n.op == "output":
        return f"return {_arg(n.args[0])}"
    else:
        args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
        body = f"{_target(n)}({', '.join(args)})"
    notes = [f"#{n.meta.get(meta.HANDLE, '?')}"]
    if meta.MODULE in n.meta:
        notes.append(f"module={n.meta[meta.MODULE]}")
    if meta.QUANT in n.meta:
        q = n.meta[meta.QUANT]
        notes.append("quant=" + ",".join(f"{k}={v}" for k, v in q.items()))
    if meta.CREATED_BY in n.meta:
        notes.append(f"by={n.meta[meta.CREATED_BY]}")
    return f"{head} = {body}  {' '.join(notes)}"


def format_ir(ir) -> str:
    lines = [f"# lowbit IR of {ir.info.source} ({ir.info.family})",
             f"# pipeline: {','.join(ir.passes_run) or '(none)'}"]
    lines += [format_node(n) for n in ir.graph.nodes]
    return "\n".join(lines) + "\n"
