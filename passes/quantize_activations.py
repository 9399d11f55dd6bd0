"""Activation and KV-cache quantization, simulated in the reference backend with integer
rounding (lowbit.quantize_tokens): per token, dynamic ranges, as W4A8 / W4A4KV4 kernels see them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Lossy, Pass, PassContext, PassFailure, PassResult, register

_OP = torch.ops.lowbit.quantize_tokens.default


def _check(bits, clip):
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if not 0 < clip <= 1:
        raise ValueError(f"clip must be in (0, 1], got {clip}")


ROLES = ("qkv", "o", "up", "down")


def linear_roles(s) -> dict:
    """Linear node -> its role in its block (the analysis knows it; no module names)."""
    out = {}
    for a in s.attentions:
        out.update({a.q.node: "qkv", a.k.node: "qkv", a.v.node: "qkv", a.o.node: "o"})
    for m in s.mlps:
        out.update({m.up.node: "up", m.down.node: "down"})
        if m.gate is not None:
            out[m.gate.node] = "up"
    return out


def _contract(bits):
    return Lossy({8: 15.0}.get(bits, -10.0))   # a floor at 8 bits; below that, any finite output


def _insert(ir, x, users, args) -> torch.fx.Node:
    return ir.insert(_OP, (x, *args), after=x, swap=(x, users))


@register
class QuantizeActivations(Pass):
    """Per-token dynamic quantization of every linear's input (after any online Hadamard), lm_head excepted."""
    name = "quantize-activations"
    applications = "each linear whose input it quantizes, by its path"
    after = ("fuse-rotations", "insert-hadamard", "scale-channels", "shape-noise")

    @dataclass(frozen=True)
    class Config:
        bits: int = 8
        clip: float = 1.0     # ranges shrink by this ratio (QuaRot: 0.9 at 4 bits)
        sym: bool = False
        group: int = -1       # values per scale along the hidden dim (-1: one per token)
        lm_head: bool = False
        skip: str = ""        # roles whose inputs stay 16-bit, "|"-separated: qkv, o, up (and gate), down

        @property
        def skipped(self) -> set[str]:
            return set(filter(None, self.skip.split("|")))

        def __post_init__(self):
            _check(self.bits, self.clip)
            bad = self.skipped - set(ROLES)
            if bad:
                raise ValueError(f"skip: unknown roles {sorted(bad)} (known: {'|'.join(ROLES)})")

    def contract(self):
        return _contract(self.config.bits)

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        s = ir.analysis
        readers: dict[torch.fx.Node, list] = {}
        skip, roles = c.skipped, linear_roles(s)
        for lin in s.linears.values():
            x = lin.node.args[0]
            if (lin is s.lm_head and not c.lm_head) or getattr(x, "target", None) is _OP \
                    or roles.get(lin.node) in skip or not ctx.applies(lin.path):
                continue
            if c.group != -1 and lin.in_features % c.group:
                raise PassFailure(f"group {c.group} does not divide {lin.name}'s {lin.in_features} inputs", lin.node)
            readers.setdefault(x, []).append(lin.node)
        for x, users in readers.items():   # one quantizer per distinct input (q, k, v share one)
            _insert(ir, x, users, (c.bits, c.group, c.sym, c.clip))
        if not readers:
            return PassResult(False)
        ir.changed()
        return PassResult(True, {"quantizers": len(readers), "linears": sum(map(len, readers.values()))})


@register
class QuantizeKV(Pass):
    """Quantize keys (after RoPE and any R3 Hadamard) and values per token and head group, as a quantized KV cache stores them."""
    name = "quantize-kv"
    applications = "`KV layer 0`, `KV layer 1`, ... (each attention's keys and values)"
    after = ("fuse-rotations", "insert-hadamard", "scale-channels", "shape-noise")

    @dataclass(frozen=True)
    class Config:
        bits: int = 8
        group: int = -1       # values per scale within a head (-1: head_dim)
        clip: float = 1.0     # QuaRot: 0.95
        sym: bool = False

        def __post_init__(self):
            _check(self.bits, self.clip)

    def contract(self):
        return _contract(self.config.bits)

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        n = 0
        for i, a in enumerate(ir.analysis.attentions):
            if all(kv.target is _OP for kv in a.sdpa.args[1:3]) or not ctx.applies(f"KV layer {i}"):
                continue
            if c.group != -1 and a.head_dim % c.group:
                raise PassFailure(f"group {c.group} does not divide head_dim {a.head_dim}", a.sdpa)
            # the attention op reads K and V laid out [batch, heads, seq, head_dim]: quantizing along
            # the last dim per token and head is what the cache holds (GQA copies heads, not values)
            for kv in a.sdpa.args[1:3]:
                if kv.target is not _OP:
                    _insert(ir, kv, [a.sdpa], (c.bits, c.group, c.sym, c.clip))
                    n += 1
        if not n:
            return PassResult(False)
        ir.changed()
        return PassResult(True, {"quantizers": n, "attentions": len(ir.analysis.attentions)})
