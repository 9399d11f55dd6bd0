from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from lowbit.ir import meta
from lowbit.ir.quant import (QuantSpec, csr_rows, dequantize_codes, fit_groups, nearest_codes, pack, pack_weight,
                             packed_from_codes, quantize, weighted_kmeans)

from .base import Lossy, Pass, PassContext, PassFailure, PassResult, register
from .gptq import calibrate_and_quantize, gptq, gptq_columns
from .instruments import sqnr_db
from .sensitivity import fisher

# Minimum logits SQNR the numeric-diff instrument holds a weight quantizer to, by bits: a
# floor well under what RTN measures on stories260K and SmolLM2 (see tests), to catch breakage
# (wrong scales, wrong packing order), not to grade quality.
_MIN_SQNR_DB = {2: -10.0, 3: 0.0, 4: 5.0, 5: 10.0, 6: 15.0, 7: 20.0, 8: 25.0}
METHODS = ("rtn", "gptq", "finequant", "squeezellm")


@dataclass
class Stored:
    """One quantized weight: the tensors a dequantize op reads (in argument order), the op and its
    constant arguments, and what `lowbit inspect` reports about it."""
    tensors: dict[str, torch.Tensor | None]
    op: object
    consts: tuple
    info: dict = field(default_factory=dict)

    def w_hat(self) -> torch.Tensor:
        return self.op(*self.tensors.values(), *self.consts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values() if t is not None)


def stored_packed(p) -> Stored:
    return Stored({"qweight": p.qweight, "scales": p.scales, "zeros": p.zeros}, torch.ops.lowbit.dequantize.default,
                  (p.spec.bits, p.spec.group, p.in_features), {"bits": p.spec.bits, "group": p.spec.group, "sym": p.spec.sym})


def squeezellm(w: torch.Tensor, sensitivity: torch.Tensor, bits: int, h: torch.Tensor | None = None,
               damp: float = 0.01, act_order: bool = True) -> Stored:
    """Per output row, k-means of the row's values weighted by their sensitivity; the 2**bits
    centroids become the row's fp16 lookup table. Each value takes the code of its nearest entry,
    or, given the layer's Hessian h, GPTQ's choice with error feedback over the same tables."""
    lut, _ = weighted_kmeans(w, sensitivity, 1 << bits)
    lut = lut.to(torch.float16)
    if h is None:
        codes = nearest_codes(w, lut)
    else:
        table = lut.double()

        def grid(values, col):
            q = nearest_codes(values[:, None], table)
            return q[:, 0], torch.gather(table, 1, q)[:, 0]
        codes = gptq_columns(w, h, grid, damp, act_order).long()
    return Stored({"qweight": pack(codes, bits), "lut": lut}, torch.ops.lowbit.dequantize_lut.default,
                  (bits, w.shape[1]), {"bits": bits, "group": -1, "sym": False, "lut": 1 << bits})


def finequant_group(w: torch.Tensor, bits: int, min_group: int) -> int:
    """FineQuant's adaptive granularity, from the weights alone: start per output channel and
    move to finer groups (powers of two below K, down to `min_group`) while the step pays for
    itself: the weight SQNR it gains must exceed what its extra fp16 scale bits would buy spent
    as code bits instead (6.02 dB per bit). Matrices whose rows hold outliers, where per-channel
    scales waste most codes, go fine; well-behaved ones stay coarse and cheap. (The paper's own
    criterion is range-based with a threshold we could not read; this rule states its trade-off.)"""
    k = w.shape[1]
    candidates = [-1] + [g for g in (1 << p for p in range(12, 2, -1)) if min_group <= g < k]
    best = candidates[0]
    cost = 16 / k
    db = sqnr_db(w, dequantize_codes(*_rtn(w, QuantSpec(bits, best, True))))
    for g in candidates[1:]:
        new_db = sqnr_db(w, dequantize_codes(*_rtn(w, QuantSpec(bits, g, True))))
        new_cost = 16 / g
        if new_db - db < 6.02 * (new_cost - cost):
            break
        best, db, cost = g, new_db, new_cost
    return best


def _rtn(w, spec):
    scale, zero = fit_groups(w, spec)
    return quantize(w, scale, zero, spec), scale, zero, spec


@register
class QuantizeWeights(Pass):
    """Quantize linear weights to packed storage: rtn, gptq, finequant (adaptive group size) or squeezellm (per-row lookup tables)."""
    name = "quantize-weights"

    @dataclass(frozen=True)
    class Config:
        method: str = "rtn"
        bits: int = 4
        group: int = 128        # finequant: the smallest group it may choose; squeezellm: unused
        sym: bool = True
        clip: bool = False      # rtn, gptq: MSE search of a per-group clipping ratio
        lm_head: bool = False   # also quantize the output projection
        # gptq: dampening (fraction of mean diag H), column order by decreasing H diagonal with
        # static groups, inputs from already-quantized layers
        damp: float = 0.01
        act_order: bool = True
        sequential: bool = True
        samples: int = 64       # calibration windows (gptq: Hessians; squeezellm: Fisher information)
        gptq: bool = False      # squeezellm: pick codes from the tables with GPTQ's error feedback

        def __post_init__(self):
            if self.method not in METHODS:
                raise ValueError(f"method '{self.method}' is not available (available: {', '.join(METHODS)})")
            QuantSpec(self.bits, self.group, self.sym)
            if self.clip and self.method not in ("rtn", "gptq"):
                raise ValueError(f"clip=true searches rtn/gptq group ranges; {self.method} fits its own")
            if self.method == "finequant" and self.bits not in (4, 8):
                raise ValueError(f"finequant quantizes to int4 or int8, not {self.bits} bits")
            if self.method == "squeezellm" and self.bits > 4:
                raise ValueError(f"squeezellm lookup tables are for 2-4 bits, not {self.bits}")

    def contract(self):
        return Lossy(_MIN_SQNR_DB[self.config.bits])

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        spec = QuantSpec(c.bits, c.group, c.sym)
        s = ir.analysis
        todo = [lin for lin in s.linears.values()
                if not lin.quantized and (c.lm_head or lin is not s.lm_head)]
        if not todo:
            return PassResult(False)
        for lin in todo:
            if not torch.isfinite(ir.tensor(lin.weight)).all():
                raise PassFailure(f"weight '{lin.weight}' has NaN or Inf", lin.node)
        if c.method in ("gptq", "squeezellm") and ctx.calib is None:
            raise PassFailure(f"method={c.method} needs calibration text (compile --calib FILE)")
        fish = fisher(ir, ctx, c.samples) if c.method == "squeezellm" else {}
        bar = tqdm(total=len(todo), desc=f"quantize-weights ({c.method})", unit="linear",
                   disable=not ctx.progress, leave=False)
        stored = {}   # linear node -> (Stored, whole W, whole W_hat): dense part plus sparse outliers

        def store(lin, h=None):
            w = ir.tensor(lin.weight).float()    # the dense part, when the linear is split
            if c.method == "gptq":
                codes, scale, zero = gptq(w, h, spec, c.damp, c.act_order, clip=c.clip)
                st = stored_packed(packed_from_codes(codes, scale, zero, spec))
            elif c.method == "rtn":
                st = stored_packed(pack_weight(w, spec, clip_search=c.clip))
            elif c.method == "finequant":
                st = stored_packed(pack_weight(w, QuantSpec(c.bits, finequant_group(w, c.bits, c.group), True)))
            else:
                st = squeezellm(w, self._sensitivity(ir, lin, fish), c.bits, h, c.damp, c.act_order)
            w_hat = st.w_hat()
            if lin.sparse:
                w, w_hat = self._absorb(ir, lin, w, w_hat)
            stored[lin.node] = st, w, w_hat
            bar.update()
            return w_hat

        if c.method == "gptq" or c.gptq:
            by_node = {lin.node: lin for lin in todo}
            calibrate_and_quantize(ir.gm, list(by_node), ctx.calib[: c.samples],
                                   lambda node, w, h: store(by_node[node], h), c.sequential)
        else:
            for lin in todo:
                store(lin)
        bar.close()

        n_weights = n_bytes = partial = 0
        sqnrs, groups = {}, {}
        for lin in todo:
            st, w, w_hat = stored[lin.node]
            base = (lin.module or lin.node.name) + ".q"
            for key, t in st.tensors.items():
                if t is not None:
                    ir.set_tensor(f"{base}.{key}", t)
            # rewrite: linear(x, W, b) -> linear(x, dequantize(qweight, ...), b); a sparse_add of
            # outliers stays between the two, and its values absorb the dense error where they sit
            user = next(iter(u for u in lin.weight_node.users if u is lin.node or lin.node in u.users))
            with ir.graph.inserting_before(user):
                attrs = [ir.get_attr(f"{base}.{k}", before=user) if t is not None else None
                         for k, t in st.tensors.items()]
                deq = ir.graph.call_function(st.op, (*attrs, *st.consts))
            deq.meta[meta.TYPE] = f"f32[{w.shape[0]},{w.shape[1]}]"
            ir.stamp(deq, like=None)
            user.replace_input_with(lin.weight_node, deq)
            tensors = [f"{base}.{k}" for k, t in st.tensors.items() if t is not None]
            bpw = 8 * st.nbytes() / w.numel()
            lin.node.meta[meta.QUANT] = {"method": c.method, **st.info, "shape": list(w.shape), "tensors": tensors,
                                         "bpw": round(bpw, 4)}
            sqnrs[lin.name] = round(sqnr_db(w, w_hat), 2)
            if c.method == "finequant":
                groups[lin.name] = st.info["group"]
            n_weights += w.numel()
            n_bytes += st.nbytes()
            g = st.info["group"]
            partial += g != -1 and w.shape[1] % g != 0
        ir.remove_dead()
        ir.changed()
        vals = list(sqnrs.values())
        stats = {"linears": len(todo), "weights": n_weights, "bits_per_weight": round(8 * n_bytes / n_weights, 4),
                 "partial_last_group": int(partial), "weight_sqnr_db_min": min(vals),
                 "weight_sqnr_db_mean": round(sum(vals) / len(vals), 2), "weight_sqnr_db": sqnrs}
        if groups:
            stats["groups"] = groups
        return PassResult(True, stats)

    @staticmethod
    def _sensitivity(ir, lin, fish):
        sens = fish[lin.node.name].clone()
        if lin.sparse:   # values held by the sparse part are corrected there: no weight
            sens[_sparse_mask(ir, lin)] = 0
        return sens

    @staticmethod
    def _absorb(ir, lin, dense, dense_hat):
        """Where the sparse part holds a value, make it hold W - D_hat so that position is exact
        (up to fp16); returns the whole weight and its reconstruction."""
        crow, col, val = (ir.tensor(t) for t in lin.sparse)
        rows, cols = csr_rows(crow), col.long()
        w = dense.clone()
        w[rows, cols] += val.float()
        new = (w[rows, cols] - dense_hat[rows, cols]).to(torch.float16)
        ir.set_tensor(lin.sparse[2], new)
        w_hat = dense_hat.clone()
        w_hat[rows, cols] += new.float()
        return w, w_hat


def _sparse_mask(ir, lin) -> torch.Tensor:
    crow, col, _ = (ir.tensor(t) for t in lin.sparse)
    mask = torch.zeros(lin.out_features, lin.in_features, dtype=torch.bool)
    mask[csr_rows(crow), col.long()] = True
    return mask
