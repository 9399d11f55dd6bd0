"""GPTQ (Frantar et al., 2022) for quantize-weights{method=gptq}: calibration capture and the
column-by-column quantizer with error feedback through the inverse Hessian."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowbit.ir.experts import expert_rows, grouped_linear
from lowbit.ir.formats import Packed
from lowbit.ir.store import OnDemand

from .base import all_sum, my_share
from lowbit.ir.formats.uniform import QuantSpec, dequantize_codes, fit_groups, to_grid


def gptq(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01, act_order: bool = True,
         block: int = 128, clip: bool = False, rounds: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] given H = 2 X^T X / n [K, K]; returns (codes [N, K], scale [N, G], zero [N, G]).

    Static groups: scales and zero points come from the original W's groups, so with act_order
    (columns visited by decreasing H diagonal) the stored layout is the plain group layout and
    costs nothing at inference. Dampening adds damp * mean(diag H) to the diagonal. clip: each group's
    range is the MSE-best shrink of its min/max (as QuaRot's and SpinQuant's GPTQ do). rounds: after
    the walk, that many rounds of refitting the scales to the codes (`refit_scales`; not for offset
    "min") and one pass of coordinate descent over the codes (`descend`), both on GPTQ's objective.
    Runs where H is (a GPU's calibration walk leaves it there); the results are on the CPU."""
    w = w.to(h.device, torch.float64, copy=True)
    w[:, torch.diagonal(h) == 0] = 0                    # inputs that are always zero: free columns
    scale, zero = fit_groups(w, spec, clip)             # static groups, fp16-rounded scales
    g = spec.group_size(w.shape[1])
    col_group = torch.arange(w.shape[1], device=w.device) // g

    def grid(values, col):
        s, z = scale[:, col // g], zero[:, col // g]
        q = to_grid(values, s, z, spec)
        return q, (q - z) * s
    codes = gptq_columns(w, h, grid, damp, act_order, block)
    hd = _dampened(h, damp) if rounds else None
    for _ in range(rounds):
        scale = refit_scales(w, hd, codes, scale, zero, col_group) if spec.offset != "min" else scale
        codes = descend(w, hd, codes, dequantize_codes(codes, scale, zero, spec), grid, block)
    return codes.cpu(), scale.cpu(), zero.cpu()


def gptq_columns(w: torch.Tensor, h: torch.Tensor, grid, damp: float = 0.01, act_order: bool = True,
                 block: int = 128) -> torch.Tensor:
    """GPTQ's column loop for any per-column grid: `grid(values [N], column) -> (codes, dequantized)`
    rounds one column; the rounding error is fed forward to the columns not yet visited through
    the Cholesky factor of H^-1. Returns codes [N, K] int32."""
    n, k = w.shape
    w = w.to(h.device, torch.float64, copy=True)
    w[:, torch.diagonal(h) == 0] = 0
    perm, hinv = _factor(h, damp, act_order)
    w = w[:, perm]
    codes = torch.zeros(k, n, dtype=torch.int32, device=w.device)   # row i: the i-th column visited
    buf = torch.empty(n * max(k - block, 0), dtype=w.dtype, device=w.device)
    cols = perm.tolist()   # column numbers as Python ints (one transfer, not one per column on a GPU)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        # the block's columns as rows, so that each step reads and updates contiguous memory
        # (the same arithmetic, element by element, as on the columns: the same codes, twice as fast)
        w1, err = w[:, i1:i2].t().contiguous(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device)
        for i in range(i2 - i1):
            q, deq = grid(w1[i], cols[i1 + i])
            codes[i1 + i] = q
            e = (w1[i] - deq) / hinv[i1 + i, i1 + i]
            w1[i:] -= hinv[i1 + i, i1 + i:i2, None] * e
            err[:, i] = e
        _sub_product(w[:, i2:], err, hinv[i1:i2, i2:], buf)
    out = torch.empty(n, k, dtype=torch.int32, device=w.device)
    out[:, perm] = codes.t()
    return out


def _sub_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor):
    """out -= a @ b, the product made in `buf`, reused from block to block: the page faults of a
    fresh product as large as the weight cost two thirds as much as the product itself."""
    p = buf[:a.shape[0] * b.shape[1]].view(a.shape[0], b.shape[1])
    torch.matmul(a, b, out=p)
    out -= p


_FACTORS: dict = {}   # (id(H), its version, damp, act_order) -> (column order, U), while H lives


def _factor(h: torch.Tensor, damp: float, act_order: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column order and U, upper, with U^T U = H^-1 (H dampened, in that order). Kept while H
    lives: the linears that share an H (q, k and v; gate and up) factor it once."""
    key = (id(h), h._version, damp, act_order)
    if key not in _FACTORS:
        hd = h.double().clone()
        dead = torch.diagonal(hd) == 0
        hd[dead, dead] = 1
        perm = torch.argsort(torch.diagonal(hd), descending=True) if act_order else torch.arange(len(hd), device=h.device)
        hd = hd[perm[:, None], perm]
        hd.diagonal().add_(damp * torch.diagonal(hd).mean())   # in place: no second K x K matrix
        # with J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J): U = J L^-1 J
        l = torch.linalg.cholesky(hd.flip(0, 1))
        del hd
        _FACTORS[key] = perm, _lower_inverse(l).flip(0, 1)
        weakref.finalize(h, _FACTORS.pop, key, None)
    return _FACTORS[key]


def _lower_inverse(l: torch.Tensor) -> torch.Tensor:
    """L^-1 for L lower triangular, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]],
    so the work is in matrix products (2/3 K^3 multiply-adds; a triangular solve against I costs K^3)."""
    n = len(l)
    if n <= 512:
        return torch.linalg.solve_triangular(l, torch.eye(n, dtype=l.dtype, device=l.device), upper=False)
    m = n // 2
    a, d = _lower_inverse(l[:m, :m]), _lower_inverse(l[m:, m:])
    out = torch.zeros_like(l)
    out[:m, :m], out[m:, m:] = a, d
    out[m:, :m] = -(d @ l[m:, :m]) @ a
    return out


def _dampened(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H as GPTQ's walk sees it: inputs that are always zero given a unit diagonal, then damp *
    mean(diag H) added to the diagonal."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    return h


def refit_scales(w, h, codes, scale, zero, col_group) -> torch.Tensor:
    """Each row's group scales that minimize GPTQ's objective tr((W - W_hat) H (W - W_hat)^T) (H
    dampened: `_dampened`) for the codes and zero points as they are (a least-squares problem of
    one unknown per group, coupled through H), rounded to fp16 as stored. A group whose new scale
    is not finite or changes sign keeps its old one."""
    e = codes.to(h.dtype) - zero[:, col_group]   # W_hat = e * scale, per group
    n, groups = scale.shape
    a = torch.zeros(n, groups, groups, dtype=h.dtype, device=h.device)
    for g in range(groups):
        cols = col_group == g
        a[:, g] = torch.zeros(n, groups, dtype=h.dtype, device=h.device).index_add_(
            1, col_group, (e[:, cols] @ h[cols]) * e)
    b = torch.zeros(n, groups, dtype=h.dtype, device=h.device).index_add_(1, col_group, (w @ h) * e)
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
    new = torch.linalg.solve(a + ridge[:, None, None] * torch.eye(groups, dtype=h.dtype, device=h.device),
                             b[..., None])[..., 0].half().to(scale.dtype)
    ok = torch.isfinite(new) & (new * scale > 0)
    return torch.where(ok, new, scale)


def descend(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, w_hat: torch.Tensor, grid,
            block: int = 128) -> torch.Tensor:
    """One pass of coordinate descent on GPTQ's objective tr((W - W_hat) H (W - W_hat)^T) (H
    dampened as the walk's: `_dampened`) from `codes` (dequantized: `w_hat`): each column in turn takes, row by
    row, the grid point nearest its best value with every other column fixed, W_hat + R / H_jj with
    R = (W - W_hat) H. That point is the exact minimizer over the grid, so the pass never
    increases the objective (QuantEase, Behdin et al., 2023). R is kept up to date per block of
    columns, as GPTQ's walk keeps its error. Returns the new codes."""
    n, k = w.shape
    r = (w - w_hat) @ h
    # columns as rows, as in the walk (copies, whatever the shapes: the caller's tensors stay as they are)
    w_hat, codes = (x.t().clone(memory_format=torch.contiguous_format) for x in (w_hat, codes))
    diag = torch.diagonal(h).tolist()
    # R's columns on either side of a block: up to k less the last block's width, more than k - block
    buf = torch.empty(n * k, dtype=w.dtype, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        rb, delta = r[:, i1:i2].t().contiguous(), torch.zeros(n, i2 - i1, dtype=w.dtype, device=w.device)
        for j in range(i1, i2):
            q, deq = grid(w_hat[j] + rb[j - i1] / diag[j], j)
            d = deq - w_hat[j]
            codes[j], w_hat[j], delta[:, j - i1] = q, deq, d
            rb -= h[j, i1:i2, None] * d
        _sub_product(r[:, :i1], delta, h[i1:i2, :i1], buf)
        _sub_product(r[:, i2:], delta, h[i1:i2, i2:], buf)
        r[:, i1:i2] = rb.t()
    return codes.t().contiguous()


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
        self.unread = None

    def read(self, target: str):
        return None if target == self.unread else super().read(target)

    def run_node(self, n):
        if n not in self.targets:
            return super().run_node(n)
        # quantized in turn, a weight is read by `quantize`, not here: the walk goes on with w_hat
        self.unread = n.args[1].target if self.sequential and n.args[1].op == "get_attr" else None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.unread = None
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
                    h = all_sum(flat.T @ flat).mul_(2).div_(rows)   # in place: H can be 1 GB
            self.w_hat.update(self.quantize(group, h))
        w_hat = self.w_hat.pop(n).to(x)   # the walk's dtype and device
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
