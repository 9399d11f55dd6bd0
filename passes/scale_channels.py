"""scale-channels: AWQ's activation-aware scaling (Lin et al., 2023). Where a producer's output
channels feed a group of linears only through a channel-wise linear path, W x = (W diag(s)) (x / s)
exactly: the producer takes 1/s, the readers' input columns s. Large s on the channels with large
inputs makes the weights that meet them round with less error (relative to what they carry).
Three such places per block: a pre-norm's scale and the linears it feeds; the values (v's rows)
and o's columns; the up projection's rows and down's columns (down reads act(gate) * up, linear
in up). Each site's s is (mean |x|)^alpha, alpha from a grid, chosen by the rounding error it
leaves on the site's linears under the grid quantize-weights will use, tr(dW H dW^T) with H the
inputs' second moment from the calibration walk."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.ir.analysis import LAYOUT_OPS
from lowbit.ir.formats.uniform import QuantSpec, fake_quantize
from lowbit.ir.store import OnDemand

from .base import Exact, Pass, PassContext, PassFailure, PassResult, all_sum, my_share, register
from .fuse_rotations import check_head_path, divide_values, per_query_head, scale_rows
from .quantize_weights import QuantizeWeights

aten = torch.ops.aten


@dataclass
class Site:
    """One place scales move through: `readers` take s on their input columns; `apply(ir, s)` gives
    the producer 1/s; `tie` makes s equal where reader columns share one producer channel."""
    name: str
    readers: list           # Linear, in graph order; the first one's input is the site's input
    apply: object           # (ir, s over the readers' input columns) -> None: the producer's side
    tie: object = None      # s over reader columns -> the same s with columns that must share a value averaged


def _norm_site(ir, b) -> Site | str:
    norm = b.norm
    if norm.kind == "none":
        return "no norm before the branch"
    if norm.weight is None:
        return "its norm has no scale (folded)"
    if norm.other_users or not norm.consumers:
        return "the norm's output is read by more than linears"
    other = next((lin.node.args[0] for lin in norm.consumers if lin.node.args[0] is not norm.output), None)
    if other is not None:
        return f"a linear reads the norm's output through '{other.name}' ({other.target})"

    def apply(ir, s):
        w = ir.tensor(norm.weight).double()
        ir.set_tensor(norm.weight, ((w + norm.offset) / s - norm.offset).float())
        if norm.bias is not None:
            ir.set_tensor(norm.bias, (ir.tensor(norm.bias).double() / s).float())
    return Site(norm.path, norm.consumers, apply)


def _value_site(ir, a) -> Site | str:
    try:
        check_head_path(a)
    except PassFailure as e:
        return str(e)
    rep = a.n_heads // a.n_kv_heads

    def values(s):   # o's columns (query heads) -> one value per value channel
        return s.view(a.n_kv_heads, rep, a.head_dim).mean(1).flatten()

    return Site(a.o.path, [a.o], lambda ir, s: divide_values(ir, a, values(s)),
                tie=lambda s: per_query_head(values(s), a))


def _up_site(ir, m) -> Site | str:
    if m.gate is None:
        return f"down reads {m.act}(up): not linear in up's output"
    if m.fused_gate_up:
        return "gate and up are one fused linear"
    x = _behind_layout(m.down.node.args[0])
    if x.target is not aten.mul.Tensor or len(x.users) != 1:
        return f"down reads '{x.name}', not the product act(gate) * up alone"
    sides = [_behind_layout(a) if isinstance(a, fx.Node) else a for a in x.args[:2]]
    if m.up.node not in sides or len(m.up.node.users) != 1:
        return "up's output reaches down other than as one factor of act(gate) * up"
    return Site(m.down.path, [m.down], lambda ir, s: scale_rows(ir, m.up, 1 / s))


def _behind_layout(n: fx.Node) -> fx.Node:
    while n.target in LAYOUT_OPS and len(n.all_input_nodes) == 1:
        n = n.all_input_nodes[0]
    return n


def best_scale(ws: list[torch.Tensor], h: torch.Tensor, mean_abs: torch.Tensor, spec: QuantSpec, alphas: int,
               tie=None) -> tuple[torch.Tensor, float, float, float]:
    """AWQ's search: s = m^alpha / sqrt(max * min) for alpha in 0, 1/alphas, ..., (alphas-1)/alphas; the
    one leaving the least sum over ws of tr(dW H dW^T), dW = Q(W diag(s)) diag(s)^-1 - W.
    Returns (s, alpha, its error, the error of alpha 0: no scaling)."""
    m = mean_abs.double()
    m = m.clamp_min(m.max() * 1e-4)   # dead inputs: no scale past 1e4^alpha
    best = None
    for i in range(alphas):
        alpha = i / alphas
        s = m.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if tie is not None:
            s = tie(s)
        err = 0.0
        for w in ws:
            dw = fake_quantize(w * s, spec) / s - w
            err += ((dw @ h) * dw).sum().item()
        if i == 0:
            base = err
        if best is None or err < best[2]:
            best = (s, alpha, err)
    return (*best, base)


class _Walk(OnDemand):
    """Runs the calibration batch; at each site's first reader, measures its input (H, mean |x|)
    and calls choose(site, h, m, the readers' weights as read), which picks s and rewrites the
    stored tensors; the walk itself goes on with the weights as they were (the model's function is
    unchanged, so every later site sees the inputs it will have)."""

    class Done(Exception):
        pass

    def __init__(self, ir, sites, choose):
        super().__init__(ir)
        self.first = {site.readers[0].node: site for site in sites}
        self.choose = choose
        self.kept = {}   # weight target -> its tensor before scaling, for readers after a site's first

    def read(self, target):
        return self.kept.pop(target) if target in self.kept else super().read(target)

    def run_node(self, n):
        site = self.first.pop(n, None)
        if site is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        flat = x.reshape(-1, x.shape[-1]).double()
        rows = all_sum(torch.tensor([flat.shape[0]], dtype=torch.float64))
        h = all_sum(flat.T @ flat) / rows
        m = all_sum(flat.abs().sum(0)) / rows
        for lin in site.readers[1:]:
            self.kept[lin.weight] = self.ir.tensor(lin.weight)
        self.choose(site, h, m, [args[1], *(self.kept[lin.weight] for lin in site.readers[1:])])
        out = F.linear(x, args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        if not self.first:
            raise self.Done
        return out


@register
class ScaleChannels(Pass):
    """AWQ: per-channel scales moved from each linear group's inputs into its weights (a norm's scale, the values, the up projection), chosen by the rounding error they leave; exact."""
    name = "scale-channels"
    applications = ("each site by name: a pre-norm's weight path for the linears it feeds (`layers.3.input_layernorm.weight`), "
                    "o's path for the values (`layers.3.self_attn.o_proj`), down's for the up projection (`layers.3.mlp.down_proj`)")
    after = ("fuse-rotations", "learn-rotations")
    reads_later = (QuantizeWeights,)

    @dataclass(frozen=True)
    class Config:
        # the grid the search rounds to; bits=0: the first quantize-weights after it (its bits, group, sym, offset)
        bits: int = 0
        group: int = 128
        sym: bool = False
        offset: str = "zero"
        alphas: int = 20        # alpha in 0, 1/alphas, ..., (alphas-1)/alphas
        samples: int = 64       # calibration windows

        def __post_init__(self):
            if self.bits:
                QuantSpec(self.bits, self.group, self.sym, self.offset)
            if self.alphas < 1:
                raise ValueError(f"alphas must be at least 1, got {self.alphas}")

    def contract(self):
        return Exact(1e-4)

    def _spec(self, ctx) -> QuantSpec:
        c = self.config
        if c.bits:
            return QuantSpec(c.bits, c.group, c.sym, c.offset)
        nxt = ctx.later.get(QuantizeWeights) or []
        if not nxt:
            raise PassFailure("scale-channels needs the grid it rounds to: bits=... (no quantize-weights after it)")
        return nxt[0].config.spec()

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        if ctx.calib is None:
            raise PassFailure("scale-channels needs calibration text (compile --calib FILE)")
        s = ir.analysis
        sites, skipped, norms = [], {}, set()
        for i, b in enumerate(s.blocks):
            found = [("norm", _norm_site(ir, b) if b.norm.output not in norms else "shared with the block before")]
            norms.add(b.norm.output)
            if b.attention:
                found.append(("values", _value_site(ir, b.attention)))
            if b.mlp:
                found.append(("up", _up_site(ir, b.mlp) if not b.mlp.router else "a mixture of experts"))
            for kind, site in found:
                if isinstance(site, Site) and any(lin.frozen or lin.experts for lin in site.readers):
                    site = f"'{site.readers[0].path}' is already quantized or split, or an expert stack"
                if isinstance(site, str):
                    skipped[f"block {i} {kind}"] = site
                elif ctx.applies(site.name):
                    sites.append(site)
        if not sites:
            return PassResult(False, {"skipped": skipped})
        spec = self._spec(ctx)
        bar = tqdm(total=len(sites), desc="scale-channels", unit="site", disable=not ctx.progress, leave=False)
        chosen = {}

        def choose(site, h, m, ws):
            ws = [w.double() for w in ws]
            sc, alpha, err, base = best_scale(ws, h, m, spec, c.alphas, site.tie)
            if alpha > 0:
                for lin, w in zip(site.readers, ws):
                    ir.set_tensor(lin.weight, (w * sc).float())
                site.apply(ir, sc)
            chosen[site.name] = {"alpha": alpha, "error_ratio": round(err / base, 4) if base else 1.0}
            bar.update()

        try:
            with torch.no_grad():
                _Walk(ir, sites, choose).run(my_share(ctx.calib[: c.samples]))
        except _Walk.Done:
            pass
        bar.close()
        scaled = sum(v["alpha"] > 0 for v in chosen.values())
        if scaled:
            ir.changed()
        ratios = [v["error_ratio"] for v in chosen.values()]
        return PassResult(scaled > 0, {"sites": len(chosen), "scaled": scaled, "grid": str(spec),
                                       "error_ratio_mean": round(sum(ratios) / len(ratios), 4),
                                       "chosen": chosen, "skipped": skipped})
