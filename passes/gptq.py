"""GPTQ (Frantar et al., 2022) for quantize-weights{method=gptq}: calibration capture and the
column-by-column quantizer with error feedback through the inverse Hessian."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.ir.experts import expert_rows, grouped_linear
from lowbit.ir.formats import Packed
from lowbit.ir.store import OnDemand

from .base import all_sum, my_share
from lowbit.ir.formats.uniform import QuantSpec, fit_groups, to_grid


def gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = True,
         block: int = 128, clip: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] given H = 2 X^T X / n [K, K]; returns (codes [N, K], scale [N, G], zero [N, G]).

    Static groups: scales and zero points come from the original W's groups, so with act_order
    (columns visited by decreasing H diagonal) the stored layout is the plain group layout and
    costs nothing at inference. Dampening adds damp * mean(diag H) to the diagonal. clip: each group's
    range is the MSE-best shrink of its min/max (as QuaRot's and SpinQuant's GPTQ do). Runs where
    H is (a GPU's calibration walk leaves it there); the results are on the CPU."""
    w = w.to(h.device, torch.float64, copy=True)
    w[:, torch.diagonal(h) == 0] = 0                    # inputs that are always zero: free columns
    scale, zero = fit_groups(w, spec, clip)             # static groups, fp16-rounded scales
    g = spec.group_size(w.shape[1])

    def grid(values, col):
        s, z = scale[:, col // g], zero[:, col // g]
        q = to_grid(values, s, z, spec)
        return q, (q - z) * s
    return gptq_columns(w, h, grid, damp, act_order, block).cpu(), scale.cpu(), zero.cpu()


def gptq_columns(w: torch.Tensor, h: torch.Tensor, grid, damp: float = 0.01, act_order: bool = True,
                 block: int = 128) -> torch.Tensor:
    """GPTQ's column loop for any per-column grid: `grid(values [N], column) -> (codes, dequantized)`
    rounds one column; the rounding error is fed forward to the columns not yet visited through
    the Cholesky factor of H^-1. Returns codes [N, K] int32."""
    n, k = w.shape
    w = w.to(h.device, torch.float64, copy=True)
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=h.device)
    w, h = w[:, perm], h[perm[:, None], perm]
    h.diagonal().add_(damp * torch.diagonal(h).mean())   # in place: no second K x K matrix
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    cols = perm.tolist()   # column numbers as Python ints (one transfer, not one per column on a GPU)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            q, deq = grid(w1[:, i], cols[i1 + i])
            codes[:, i1 + i] = q.to(torch.int32)
            e = (w1[:, i] - deq) / hinv[i1 + i, i1 + i]
            w1[:, i:] -= e[:, None] * hinv[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


@dataclass
class ExpertHessians:
    """An expert stack's Hessians, one per expert from the rows routed to it (None where no row
    was: that expert is rounded to nearest, as a weight without data), and those row counts."""
    h: list[torch.Tensor | None]
    rows: list[int]

    @classmethod
    def of(cls, x: torch.Tensor, offsets: torch.Tensor) -> "ExpertHessians":
        hs, rows = [], []
        for s, e in expert_rows(offsets):
            flat = x[s:e].double()
            n = int(all_sum(torch.tensor([e - s], dtype=torch.float64, device=x.device)).item())
            h = all_sum(flat.T @ flat)
            hs.append(h * 2 / n if n else None)
            rows.append(n)
        return cls(hs, rows)

    def quantize(self, quantize, w: torch.Tensor, sens) -> Packed:
        """quantize(w_e, h_e, sens_e) -> Packed for each expert's rows of w [E*N, K]; their packed
        tensors stacked in the same row order (every format here stores per row)."""
        n = w.shape[0] // len(self.h)
        parts = [quantize(w[i * n:(i + 1) * n], h, None if sens is None else sens[i * n:(i + 1) * n])
                 for i, h in enumerate(self.h)]
        first = parts[0]
        if any(p.format is not first.format or p.consts != first.consts for p in parts):
            raise ValueError("experts quantized to different layouts cannot share one stack")
        tensors = {k: None if t is None else torch.cat([p.tensors[k] for p in parts]) for k, t in first.tensors.items()}
        return Packed(first.format, tensors, first.consts, {**first.info, "expert_rows": self.rows})


class _Calibrate(OnDemand):
    """Runs the graph on the whole calibration batch node by node; at the first linear to quantize
    reading an input it accumulates H from that input and calls `quantize(group, h) -> {node:
    w_hat}` for the group of targets reading it (q, k and v; gate and up: one H), then continues
    with each w_hat (sequential) or the original weight. Values (weights on disk included: they
    are read when their node runs) are freed after their last use, and the walk stops after the
    last linear, so memory holds about one layer's tensors."""

    class Done(Exception):
        pass

    def __init__(self, ir, targets, quantize, sequential, known=(), device=None):
        super().__init__(ir, device)
        self.targets, self.quantize, self.sequential = set(targets), quantize, sequential
        self.known = set(known)   # targets already quantized (a resumed compile): no H for them
        self.order = {n: i for i, n in enumerate(ir.graph.nodes)}
        self.w_hat = {}   # target -> its quantized weight, made with its group

    def run_node(self, n):
        if n not in self.targets:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x, w = args[0], args[1]
        grouped = n.target is grouped_linear._opoverload   # an expert stack: args[2] holds the offsets
        bias = None if grouped else args[2] if len(args) > 2 else kwargs.get("bias")
        if n not in self.w_hat:
            group = sorted((u for u in n.args[0].users if u in self.targets), key=self.order.get)
            h = None
            if any(u not in self.known for u in group):   # with several processes: each holds a share of the windows, H sums them
                if grouped:
                    h = ExpertHessians.of(x, args[2])
                else:
                    flat = x.reshape(-1, x.shape[-1]).double()
                    rows = all_sum(torch.tensor([flat.shape[0]], dtype=torch.float64, device=flat.device))
                    h = all_sum(flat.T @ flat) * 2 / rows
            self.w_hat.update(self.quantize(group, h))
        w_hat = self.w_hat.pop(n).to(w)   # its dtype, on the walk's device
        self.targets.discard(n)
        w = w_hat if self.sequential else w
        out = grouped_linear(x, w, args[2]) if grouped else F.linear(x, w, bias)
        if not self.targets:
            raise self.Done
        return out


@torch.no_grad()
def calibrate_and_quantize(ir, targets, calib: torch.Tensor, quantize, sequential: bool = True, known=(),
                           device=None):
    """Walk the calibration batch (on `device`: the activations and H there), calling quantize(group,
    H) -> {node: w_hat} at the first of each group of targets reading one input (H None when the
    group is all `known`, whose results exist already), and continue with what it returns."""
    try:
        _Calibrate(ir, targets, quantize, sequential, known, device).run(my_share(calib).to(device or "cpu"))
    except _Calibrate.Done:
        pass
