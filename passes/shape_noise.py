"""shape-noise: an online matrix on each branch's input (a block norm's output) that shapes the rounding
noise of the per-token activation quantizer. For an input x read as x M by the branch's linears
(which take W M^-T, exact), a rounding noise of the transformed input's own scale costs about
tr(M^T C M) tr(M^-1 G M^-T) at the outputs, C the inputs' second moment and G = sum W^T W over the
readers. An orthogonal M (a rotation, learned or not) leaves that product at tr C tr G; the least over
all M is reached at M = T Q with T = (C^-1 # G)^(1/2), the square root of the matrix geometric mean of
C^-1 and G, and Q any rotation: Q is a seeded random orthogonal matrix, which spreads each token over
the channels so that its largest value, which sets the quantizer's step, stays near its root mean
square. On SmolLM2-135M the product falls to 0.10-0.25 of a rotation's. The weights' rounding error
through the same inputs falls alike (the bound is symmetric in the two). The online cost is one dense
d x d product per branch input and token (lowbit.rotate_kron with A = M).
The keys the KV cache stores get the same: each attention's keys (after RoPE and R3) times T Q and
its queries times T^-1 Q, which leaves q k^T as it was; C is the keys' second moment and G the
queries' (the keys' error reaches the scores through them), over all heads: one head_dim x head_dim
pair per attention. Where a quantizer follows, each site takes T Q, T^(1/2) Q or nothing, whichever
leaves the least error through that quantizer on its first calibration rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lowbit.ir import meta
from lowbit.ir.hadamard import hadamard, random_orthogonal, rotate_kron
from lowbit.ir.quant import quantize_tokens
from lowbit.ir.store import Segments

from .base import Exact, Pass, PassContext, PassFailure, PassResult, all_sum, my_share, register
from .insert_hadamard import InsertHadamard
from .quantize_activations import QuantizeActivations, QuantizeKV

_KRON = rotate_kron._opoverload
SAMPLE_ROWS = 2048   # per site: the rows the choice of T's power is measured on
_PREFIX = "shape_noise."   # the matrices' tensor names: how a node this pass made is known again


def _psd_pow(a: torch.Tensor, *ps: float) -> list[torch.Tensor]:
    """a^p for each p (a symmetric positive semi-definite), from one eigendecomposition."""
    w, v = torch.linalg.eigh(a)
    return [(v * w.clamp_min(w.max() * 1e-12) ** p) @ v.T for p in ps]


def shaping(c: torch.Tensor, g: torch.Tensor, ridge: float, powers=(1.0,)) -> dict[float, tuple]:
    """{power: (T^power, T^-power, the noise product's ratio to a rotation's)} for input second moment C
    and readers' Gram G (float64), each with `ridge` times its mean eigenvalue added;
    T = (C^-1 # G)^(1/2), scaled to a unit geometric mean of its eigenvalues."""
    eye = torch.eye(len(c), dtype=c.dtype)
    c = c + ridge * c.trace() / len(c) * eye
    g = g + ridge * g.trace() / len(g) * eye
    ch, cih = _psd_pow(c, 0.5, -0.5)
    p = cih @ _psd_pow(ch @ g @ ch, 0.5)[0] @ cih   # C^-1 # G
    lam, v = torch.linalg.eigh(p)
    out = {}
    for power in powers:
        w = lam.clamp_min(lam.max() * 1e-12).pow(power / 2)
        w = w / w.log().mean().exp()
        t, ti = (v * w) @ v.T, (v / w) @ v.T
        out[power] = (t, ti, (torch.trace(t @ c @ t) * torch.trace(ti @ g @ ti) / (c.trace() * g.trace())).item())
    return out


def measured_error(x: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, mi: torch.Tensor | None,
                   quant) -> tuple[float, float]:
    """(sum over rows of e G e^T, sum of x G x^T) for e = quant(x M) M^-1 - x, given M and M^-T
    (None: x as it is), summed over the compile's processes."""
    z = quant(x if m is None else x @ m)
    e = (z if m is None else z @ mi.T) - x
    out = torch.stack([((e @ g) * e).sum(), ((x @ g) * x).sum()])
    return tuple(all_sum(out).tolist())


def _quantizer(entry):
    """rows -> their rounding by a later quantize-activations or quantize-kv entry (per row), or None."""
    if entry is None:
        return None
    k = entry.config
    return lambda z: quantize_tokens(z.float(), k.bits, k.group, k.sym, k.clip).double()


def _ours(n) -> bool:
    return getattr(n, "target", None) is _KRON and str(n.args[1].target).startswith(_PREFIX)


def _input_site(readers, what: str):
    """(the node `readers` (linears) all read, the readers), or why not."""
    if not readers:
        return f"no linear reads {what}"
    if any(lin.frozen or lin.experts for lin in readers):
        return f"'{readers[0].path}' is already quantized or split, or an expert stack"
    xs = {lin.node.args[0] for lin in readers}
    if len(xs) > 1:
        return f"its linears read {what} through different nodes"
    x = next(iter(xs))
    if _ours(x) or getattr(x, "target", None) is torch.ops.lowbit.quantize_tokens.default:
        return f"its input is already transformed or quantized ('{x.name}')"
    return x, readers


def _key_site(a):
    """(the queries' node, the keys' node) after RoPE and any R3, or why not."""
    if a.rope_q is None or a.rope_k is None:
        return "no whole-head queries and keys found"
    if a.sdpa.args[1].target is torch.ops.lowbit.quantize_tokens.default:
        return "its keys are already quantized"
    ends = []
    for n in (a.rope_q, a.rope_k):
        if len(n.users) == 1 and next(iter(n.users)).target in (hadamard._opoverload, _KRON):
            n = next(iter(n.users))   # R3
        if _ours(n) or any(_ours(u) for u in n.users):
            return "its keys are already transformed"
        ends.append(n)
    return tuple(ends)


@register
class ShapeNoise(Pass):
    """Online matrices T Q on each branch's input and on the keys (T from calibration statistics, Q a random rotation) that shape the 4-bit activation and KV noise away from what the weights and queries amplify; exact."""
    name = "shape-noise"
    applications = ("each branch by its norm's path (`layers.3.input_layernorm.weight`; a folded norm by its node's "
                    "name), each attention's keys as `keys 0`, `keys 1`, ..., each down projection by its path")
    after = ("fold-norms", "fuse-rotations", "insert-hadamard", "learn-rotations", "scale-channels")
    reads_later = (QuantizeActivations, QuantizeKV)

    @dataclass(frozen=True)
    class Config:
        samples: int = 64     # calibration windows
        ridge: float = 1e-3   # added to C and G, times their mean eigenvalue
        seed: int = 0         # of Q
        keys: bool = True     # the keys too (and the queries, inversely)
        down: bool = False    # the down projections' inputs too (a d_ff x d_ff product per token)

        def __post_init__(self):
            if not 0 <= self.ridge < 1:
                raise ValueError(f"ridge must be in [0, 1), got {self.ridge}")

    def contract(self):
        return Exact(1e-3)

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        if ctx.calib is None:
            raise PassFailure("shape-noise needs calibration text (compile --calib FILE)")
        s = ir.analysis
        branches, keys, skipped, seen = {}, {}, {}, set()
        for i, b in enumerate(s.blocks):
            site = _input_site(b.norm.consumers, "the branch's norm") if b.norm.output not in seen \
                else "shared with the block before"
            seen.add(b.norm.output)
            if isinstance(site, str):
                skipped[f"block {i}"] = site
            elif ctx.applies(b.norm.path):
                branches[b.norm.path] = site
        for i, m in enumerate(s.mlps if c.down else []):
            site = _input_site([m.down], "the MLP's product")
            if isinstance(site, str):
                skipped[f"down {i}"] = site
            elif ctx.applies(m.down.path):
                branches[m.down.path] = site
        for i, a in enumerate(s.attentions if c.keys else []):
            site = _key_site(a)
            if isinstance(site, str):
                skipped[f"keys {i}"] = site
            elif ctx.applies(f"keys {i}"):
                keys[f"keys {i}"] = site
        if not branches and not keys:
            return PassResult(False, {"skipped": skipped})
        act, kv = ((ctx.later.get(cls) or [None])[0] for cls in (QuantizeActivations, QuantizeKV))
        cut = Segments(ir)
        due = {}   # block -> the sites decided once it has run over every window (the last holding them or their readers)
        for name, (x, readers) in branches.items():
            due.setdefault(max(cut.seg[n] for n in (x, *(lin.node for lin in readers))), []).append(name)
        for name, (qn, kn) in keys.items():
            due.setdefault(max(cut.seg[qn], cut.seg[kn]), []).append(name)
        watch = {x for x, _ in branches.values()} | {n for pair in keys.values() for n in pair}
        sums, rows, sample = {}, {}, {}
        moment = lambda n: all_sum(sums.pop(n)) / all_sum(torch.tensor([float(rows.pop(n))], dtype=torch.float64))  # noqa: E731
        envs = [{cut.start: win} for win in my_share(ctx.calib[: c.samples]).split(4)]
        chosen, todo = {}, []   # todo: (site, the node to transform, its readers or None (all), the matrix's tensor)
        for k in tqdm(range(max(due) + 1), desc="shape-noise", unit="block", disable=not ctx.progress, leave=False):
            for i, env in enumerate(envs):
                with torch.no_grad():
                    cut.run(k, env)
                for n in watch.intersection(cut.segments[k]):   # each node's second moment over its rows, in window order
                    x = env[n].detach().reshape(-1, env[n].shape[-1]).double()
                    sums[n], rows[n] = sums.get(n, 0) + x.T @ x, rows.get(n, 0) + len(x)
                    sample.setdefault(n, x[:SAMPLE_ROWS].float().clone())
                envs[i] = cut.handed_on(k, env)
            for name in due.get(k, ()):
                if name in keys:   # C the keys' moment, G the queries'
                    qn, kn = keys[name]
                    m, mi, chosen[name] = self._choose(moment(kn), moment(qn), sample.pop(kn), _quantizer(kv))
                    del sample[qn]
                    if m is not None:
                        todo += [(name, kn, None, self._store(ir, name + " k", m)),   # k T Q
                                 (name, qn, None, self._store(ir, name + " q", mi))]   # q T^-1 Q: q k^T unchanged
                    continue
                x, readers = branches[name]
                weight = lambda lin: ir.tensor(lin.weight).double()  # noqa: E731   (one at a time in memory)
                g = sum(w.T @ w for w in map(weight, readers))   # expert stacks are skipped: each is [N, K]
                m, mi, chosen[name] = self._choose(moment(x), g, sample.pop(x), _quantizer(act))
                if m is not None:
                    for lin in readers:   # W M^-T
                        ir.set_tensor(lin.weight, (weight(lin) @ mi).float())
                    todo.append((name, x, [lin.node for lin in readers], self._store(ir, name, m)))
        del envs
        order = list(branches) + list(keys)
        for name, x, users, target in sorted(todo, key=lambda t: order.index(t[0])):
            h = InsertHadamard._insert_after(ir, x, users, _KRON, [target, _PREFIX + "one"])
            h.meta[meta.TYPE] = x.meta.get(meta.TYPE, "")
            for u in users or ():
                u.meta.setdefault(meta.ROTATIONS, []).append("noise shaping T Q (online)")
        chosen = {name: chosen[name] for name in order}
        shaped = [v["noise_ratio"] for v in chosen.values() if v["power"] > 0]
        if shaped:
            ir.changed()
        return PassResult(bool(shaped), {"sites": len(shaped), "kept": len(chosen) - len(shaped),
                                         "noise_ratio_mean": round(sum(shaped) / len(shaped), 4) if shaped else 1.0,
                                         "chosen": chosen, "skipped": skipped})

    def _choose(self, moment, g, sample, quant):
        """(T^p Q, T^-p Q, stats) for the p in 0, 1/2, 1 whose error, measured on the sample rows
        through the quantizer that follows (relative e G e^T), is least; p 0 is the input as it
        is (None, None). With no quantizer after this pass, p 1."""
        q = random_orthogonal(len(g), self.config.seed)
        options = {0.0: (None, None, 1.0)} if quant is not None else {}
        for p, (t, ti, ratio) in shaping(moment, g, self.config.ridge, (0.5, 1.0) if quant is not None else (1.0,)).items():
            options[p] = (t @ q, ti @ q, ratio)
        if quant is None:
            return (*options[1.0][:2], {"power": 1.0, "noise_ratio": round(options[1.0][2], 4)})
        x = sample.double()
        errs = {p: measured_error(x, g, m, mi, quant) for p, (m, mi, _) in options.items()}
        errs = {p: e / base for p, (e, base) in errs.items()}
        p = min(errs, key=errs.get)
        return (*options[p][:2], {"power": p, "noise_ratio": round(options[p][2], 4),
                                  "error_ratio": round(errs[p] / errs[0.0], 4)})

    @staticmethod
    def _store(ir, name, m) -> str:
        """Keep M as the tensor of site `name` (with the 1x1 second factor of rotate_kron); its name."""
        target = _PREFIX + name.replace(" ", "_").replace(".", "_")
        ir.set_tensor(target, m.float())
        ir.set_tensor(_PREFIX + "one", torch.ones(1, 1))
        return target
