"""quantize-weights: every linear's weight to a packed weight format (ir/formats). The method is
one scheme config class each (RTN, GPTQ, FineQuant, SqueezeLLM: plain data, built from the
pass's options) and a quantizer registered for that class, so a new method is a class and a
function, not a branch."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from tqdm import tqdm

from lowbit.ir import meta
from lowbit.ir.formats import FORMATS, Packed, WeightFormat, lut, uniform
from lowbit.ir.formats.sparse import csr_rows
from lowbit.ir.formats.uniform import QuantSpec

from .base import Lossy, Pass, PassContext, PassFailure, PassResult, ranks, register
from .gptq import ExpertHessians, calibrate_and_quantize, gptq, gptq_columns
from .instruments import sqnr_db
from .sensitivity import fisher, rank_for_precision, within

log = logging.getLogger("lowbit")

# Minimum logits SQNR the numeric-diff instrument holds a weight quantizer to, by bits: a
# floor well under what RTN measures on stories260K and SmolLM2 (see tests), to catch breakage
# (wrong scales, wrong packing order), not to grade quality.
_MIN_SQNR_DB = {2: -10.0, 3: 0.0, 4: 5.0, 5: 10.0, 6: 15.0, 7: 20.0, 8: 25.0}


# -- schemes: what each method needs, as data -----------------------------------------------------------
class Scheme:
    """What a method needs besides the weight: each linear's input Hessian (from the graph walk over
    the calibration batch) and the diagonal Fisher information (calibration gradients)."""
    hessian: ClassVar[bool] = False
    fisher: ClassVar[bool] = False


@dataclass(frozen=True)
class RTN(Scheme):
    """Round to nearest on a uniform grid; clip searches each group's range by weight MSE."""
    spec: QuantSpec
    clip: bool = False


@dataclass(frozen=True, kw_only=True)
class ColumnWalk(Scheme):
    """Options of GPTQ's column walk: dampening (a fraction of mean diag H), columns by decreasing
    H diagonal (with static groups)."""
    damp: float = 0.01
    act_order: bool = True


@dataclass(frozen=True)
class GPTQ(ColumnWalk):
    """GPTQ's column walk with error feedback through the inverse Hessian, static groups; then
    `refine` rounds of scales refitted to the codes and coordinate descent over the codes."""
    spec: QuantSpec
    clip: bool = False
    refine: int = 0
    hessian: ClassVar[bool] = True


@dataclass(frozen=True)
class FineQuant(Scheme):
    """Symmetric int4/int8 with a group size chosen per matrix (down to min_group), data-free."""
    bits: int
    min_group: int


@dataclass(frozen=True)
class SqueezeLLM(ColumnWalk):
    """Fisher-weighted k-means lookup table per output row; codes by nearest entry, or by GPTQ's walk."""
    bits: int
    gptq: bool = False
    fisher: ClassVar[bool] = True

    @property
    def hessian(self) -> bool:
        return self.gptq


@dataclass(frozen=True)
class Quantized:
    """What quantizing one linear leaves besides its packed tensors (already in the IR, by name)."""
    format: WeightFormat
    tensors: list[str | None]   # IR targets in the format op's argument order; None: absent
    consts: tuple
    info: dict
    shape: tuple[int, int]
    nbytes: int
    sqnr_db: float

    def note(self) -> dict:
        return {"format": self.format.name, "tensors": self.tensors, "consts": list(self.consts), "info": self.info,
                "shape": list(self.shape), "nbytes": self.nbytes, "sqnr_db": self.sqnr_db}

    @classmethod
    def from_note(cls, d: dict) -> "Quantized":
        fmt = next(f for f in FORMATS if f.name == d["format"])
        return cls(fmt, d["tensors"], tuple(d["consts"]), d["info"], tuple(d["shape"]), d["nbytes"], d["sqnr_db"])


QUANTIZERS: dict[type, Callable] = {}   # scheme class -> (scheme, W, H or None, sensitivity or None) -> Packed


def quantizer(scheme: type):
    def put(fn):
        QUANTIZERS[scheme] = fn
        return fn
    return put


@quantizer(RTN)
def _rtn(s: RTN, w, h, sens) -> Packed:
    return uniform.pack_weight(w, s.spec, clip_search=s.clip)


@quantizer(GPTQ)
def _gptq(s: GPTQ, w, h, sens) -> Packed:
    if h is None:   # no calibration row reached it (an expert no token was routed to)
        return _rtn(RTN(s.spec, s.clip), w, h, sens)
    return uniform.packed(*gptq(w, h, s.spec, s.damp, s.act_order, clip=s.clip, rounds=s.refine), s.spec)


@quantizer(FineQuant)
def _finequant(s: FineQuant, w, h, sens) -> Packed:
    return uniform.pack_weight(w, QuantSpec(s.bits, finequant_group(w, s.bits, s.min_group), True))


@quantizer(SqueezeLLM)
def _squeezellm(s: SqueezeLLM, w, h, sens) -> Packed:
    return squeezellm(w, sens, s.bits, h.cpu() if s.gptq and h is not None else None, s.damp, s.act_order)


def squeezellm(w: torch.Tensor, sensitivity: torch.Tensor, bits: int, h: torch.Tensor | None = None,
               damp: float = 0.01, act_order: bool = True) -> Packed:
    """Per output row, k-means of the row's values weighted by their sensitivity; the 2**bits
    centroids become the row's fp16 lookup table. Each value takes the code of its nearest entry,
    or, given the layer's Hessian h, GPTQ's choice with error feedback over the same tables."""
    table, _ = lut.weighted_kmeans(w, sensitivity, 1 << bits)
    table = table.to(torch.float16)
    if h is None:
        codes = lut.nearest_codes(w, table)
    else:
        t = table.double()

        def grid(values, col):
            q = lut.nearest_codes(values[:, None], t)
            return q[:, 0], torch.gather(t, 1, q)[:, 0]
        codes = gptq_columns(w, h, grid, damp, act_order).long()
    return lut.packed(codes, table, bits)


def finequant_group(w: torch.Tensor, bits: int, min_group: int) -> int:
    """FineQuant's adaptive granularity, from the weights alone: start per output channel and
    move to finer groups (powers of two below K, down to `min_group`) while the step pays for
    itself: the weight SQNR it gains must exceed what its extra fp16 scale bits would buy spent
    as code bits instead (6.02 dB per bit). Matrices whose rows hold outliers, where per-channel
    scales waste most codes, go fine; well-behaved ones stay coarse and cheap. (The paper's own
    criterion is range-based with a threshold we could not read; this rule states its trade-off.)"""
    k = w.shape[1]
    candidates = [-1] + [g for g in (1 << p for p in range(12, 2, -1)) if min_group <= g < k]

    def db(g):   # in float64, from the fp16-rounded scales
        spec = QuantSpec(bits, g, True)
        scale, zero = uniform.fit_groups(w, spec)
        return sqnr_db(w, uniform.dequantize_codes(uniform.quantize(w, scale, zero, spec), scale, zero, spec))
    best, best_db, cost = candidates[0], db(candidates[0]), 16 / k
    for g in candidates[1:]:
        new_db, new_cost = db(g), 16 / g
        if new_db - best_db < 6.02 * (new_cost - cost):
            break
        best, best_db, cost = g, new_db, new_cost
    return best


SCHEMES = {"rtn": lambda c: RTN(c.spec(), c.clip),
           "gptq": lambda c: GPTQ(c.spec(), c.clip, c.refine, damp=c.damp, act_order=c.act_order),
           "finequant": lambda c: FineQuant(c.bits, c.group),
           "squeezellm": lambda c: SqueezeLLM(c.bits, c.gptq, damp=c.damp, act_order=c.act_order)}


@register
class QuantizeWeights(Pass):
    """Quantize linear weights to packed storage: rtn, gptq, finequant (adaptive group size) or squeezellm (per-row lookup tables)."""
    name = "quantize-weights"
    applications = "each linear not quantized yet, by its path (`layers.3.mlp.down_proj`, `lm_head`)"
    after = ("fuse-rotations", "insert-hadamard", "split-outliers", "learn-rotations", "scale-channels", "shape-noise")

    @dataclass(frozen=True)
    class Config:
        method: str = "rtn"
        bits: int = 4
        group: int = 128        # finequant: the smallest group it may choose; squeezellm: unused
        sym: bool = True
        offset: str = "zero"    # rtn, gptq with sym=false: an integer zero point (zero) or an fp16 group minimum
                                # (min: w = code * scale + min, llama.cpp's Q4_1/Q5_1 grid); with sym=true, signed:
                                # the scale from each group's signed extreme, all 2^bits codes used (llama.cpp's Q4_0)
        clip: bool = False      # rtn, gptq: MSE search of a per-group clipping ratio
        lm_head: bool = False   # also quantize the output projection
        # gptq: dampening (fraction of mean diag H), column order by decreasing H diagonal with
        # static groups, inputs from already-quantized layers
        damp: float = 0.01
        act_order: bool = True
        sequential: bool = True
        samples: int = 64       # calibration windows (gptq: Hessians; squeezellm: Fisher information)
        gptq: bool = False      # squeezellm: pick codes from the tables with GPTQ's error feedback
        refine: int = 0         # gptq: rounds of scales refitted to the codes, then codes by coordinate descent
        # mixed precision (rtn, gptq): the linears where more bits pay most (measured sensitivity per extra
        # byte, passes/sensitivity.py) get `promote` bits, as many as fit within `max_bpw` bits per weight
        promote: int = 0
        max_bpw: float = 0.0
        rank_samples: int = 16  # calibration windows for that sensitivity (Fisher information)

        def __post_init__(self):
            if self.method not in SCHEMES:
                raise ValueError(f"method '{self.method}' is not available (available: {', '.join(SCHEMES)})")
            self.spec()
            if self.offset != "zero" and self.method not in ("rtn", "gptq"):
                raise ValueError(f"offset={self.offset} is a rtn/gptq grid; {self.method} stores its own")
            if self.refine and self.method != "gptq":
                raise ValueError(f"refine={self.refine} refines gptq's codes; {self.method} has none to refine")
            if self.clip and self.method not in ("rtn", "gptq"):
                raise ValueError(f"clip=true searches rtn/gptq group ranges; {self.method} fits its own")
            if self.method == "finequant" and self.bits not in (4, 8):
                raise ValueError(f"finequant quantizes to int4 or int8, not {self.bits} bits")
            if self.method == "squeezellm" and self.bits > 4:
                raise ValueError(f"squeezellm lookup tables are for 2-4 bits, not {self.bits}")
            if self.promote and not (self.method in ("rtn", "gptq") and self.bits < self.promote <= 8 and self.max_bpw > 0):
                raise ValueError(f"promote={self.promote} needs rtn or gptq, more bits than bits={self.bits} (at most 8) "
                                 "and max_bpw")

        def spec(self) -> QuantSpec:
            return QuantSpec(self.bits, self.group, self.sym, self.offset)

        def scheme(self):
            return SCHEMES[self.method](self)

    def contract(self):
        return Lossy(_MIN_SQNR_DB[self.config.bits])

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        scheme = c.scheme()
        s = ir.linears   # no other structure: any captured model's linears
        todo = [lin for lin in s.linears.values() if not lin.quantized and (c.lm_head or lin is not s.lm_head)
                and ctx.applies(lin.path)]
        if not todo:
            return PassResult(False)
        if (scheme.hessian or scheme.fisher or c.promote) and ctx.calib is None:
            raise PassFailure(f"method={c.method}{' with promote' if c.promote else ''} needs calibration text "
                              "(compile --calib FILE)")
        self.hessians = {}   # linear path -> what its input Hessian says (GPTQ): reported in the stats
        parts, promoted = [(scheme, todo)], []
        if c.promote:   # the promoted linears first, then the rest: as two entries would run
            high = dataclasses.replace(c, bits=c.promote, promote=0, max_bpw=0.0).scheme()
            ranked = rank_for_precision(ir, ctx, todo, scheme, high, c.rank_samples)
            k = within(ranked, c.max_bpw)
            if k is None:   # a model whose widths the groups fit badly (short last groups): nothing to spend
                log.warning("quantize-weights: bits=%d alone takes more than max_bpw=%g bits per weight here: no "
                            "linear gets %d bits", c.bits, c.max_bpw, c.promote)
                k = 0
            promoted = [r["linear"] for r in ranked[:k]]
            parts = [(high, promoted), (scheme, [lin for lin in todo if lin not in promoted])]
        stored, resumed, shares = {}, 0, []
        for part_scheme, lins in parts:
            got, n, sh = self._quantize(ir, ctx, part_scheme, lins) if lins else ({}, 0, [])
            for lin in lins:
                self._rewrite(ir, lin, got[lin.node])
            ir.remove_dead()
            ir.changed()
            stored.update(got)
            resumed += n
            shares = [a + b for a, b in zip(shares, sh)] if shares else sh
        stats = self._stats(todo, stored)
        if promoted:
            stats["promoted"] = [lin.path for lin in promoted]
        if self.hessians:
            stats["hessian"] = self.hessians
        if resumed:
            stats["resumed_linears"] = resumed
        if any(shares):
            stats["linears_per_process"] = shares
        if s.skipped:   # linears whose weight is computed, not stored: left in float, and said so
            stats["not_quantized"] = s.skipped
        return PassResult(True, stats)

    def _quantize(self, ir, ctx, scheme, todo) -> tuple[dict, int, list[int]]:
        """({linear node: Quantized}, how many came from records, how many each process quantized
        (several processes, GPTQ)). Each linear's packed tensors go into the IR as soon as they
        exist (past the memory budget, on to disk); nothing else of it is kept."""
        c = self.config
        quantize = QUANTIZERS[type(scheme)]
        fish = fisher(ir, ctx, c.samples) if scheme.fisher else {}
        bar = tqdm(total=len(todo), desc=f"quantize-weights ({c.method})", unit="linear",
                   disable=not ctx.progress, leave=False)
        stored, resumed, shares = {}, [], [0] * ranks()[1]   # shares: linears each process quantized

        def adopt(lin, tensors, note):
            """A linear's packed tensors and note, made elsewhere (a record, another process)."""
            for name, t in tensors.items():
                ir.set_tensor(name, t)
            q = Quantized.from_note(note)
            w_hat = q.format.op(*(ir.tensor(n) if n else None for n in q.tensors), *q.consts)
            stored[lin.node] = q
            bar.update()
            return _plus_sparse(ir, lin, w_hat) if lin.sparse else w_hat

        def record(lin, written, note):
            on_disk = ctx.checkpoint.put(lin.weight, written, note) if ctx.checkpoint else None
            if on_disk and ir.spill is not None:   # a model left on disk: read them from the record
                for name, t in on_disk.items():
                    ir.set_tensor(name, t)

        def store(lin, h=None):
            """(w_hat, the tensors written, their note): lin quantized, or taken from its record
            (an earlier, interrupted run of this compile: nothing written)."""
            done = ctx.checkpoint.get(lin.weight) if ctx.checkpoint else None
            if done is not None:
                resumed.append(lin.name)
                return adopt(lin, *done), None, None
            w = ir.tensor(lin.weight).float().reshape(lin.rows, -1)   # the dense part, when the linear is split
            if not torch.isfinite(w).all():
                raise PassFailure(f"weight '{lin.weight}' has NaN or Inf", lin.node)
            sens = self._sensitivity(ir, lin, fish) if scheme.fisher else None
            if isinstance(h, ExpertHessians):   # each expert with its own rows' H
                p = h.quantize(lambda *a: quantize(scheme, *a), w, sens)
            else:
                p = quantize(scheme, w, h, sens)
                if h is not None:   # input energy per channel: outlier channels show as a large max / mean
                    diag = h.diagonal()
                    self.hessians[lin.path] = {"diag_mean": diag.mean().item(), "max_over_mean":
                                               round((diag.max() / diag.mean().clamp_min(1e-30)).item(), 2),
                                               "dead_inputs": int((diag == 0).sum())}
            w_hat = p.w_hat()
            if lin.sparse:   # the whole weight (dense plus sparse): what the SQNR compares, what runs on
                w, w_hat = self._absorb(ir, lin, w, w_hat)
            names = [f"{lin.home}.q.{k}" if t is not None else None for k, t in p.tensors.items()]
            written = {n: t for n, t in zip(names, p.tensors.values()) if n is not None}
            for name, t in written.items():
                ir.set_tensor(name, t)
            q = Quantized(p.format, names, p.consts, p.info, tuple(w.shape), p.nbytes(), round(sqnr_db(w, w_hat), 2))
            if lin.sparse:
                written[lin.sparse[2]] = ir.tensor(lin.sparse[2])
            record(lin, written, q.note())
            stored[lin.node] = q
            bar.update()
            return w_hat, written, q.note()

        def store_group(nodes, h) -> dict:
            """The linears sharing one H; with several processes, they take turns (over the whole
            pass) quantizing those not done yet and send them to the others (rank 0 records them)."""
            rank, world = ranks()
            lins = [by_node[n] for n in nodes]
            # not the records on disk: the first process writes them meanwhile (the others would disagree)
            new = [lin for lin in lins if world > 1 and lin.node not in known]
            out = {lin.node: store(lin, h)[0] for lin in lins if lin not in new}
            owner = {lin.node: (sum(shares) + i) % world for i, lin in enumerate(new)}
            mine = {lin.node: store(lin, h) for lin in new if owner[lin.node] == rank}
            import torch.distributed as dist
            for lin in new:
                shares[owner[lin.node]] += 1
                payload = [mine[lin.node][1:] if lin.node in mine else None]
                dist.broadcast_object_list(payload, src=owner[lin.node])
                if lin.node in mine:
                    out[lin.node] = mine[lin.node][0]
                else:
                    out[lin.node] = adopt(lin, *payload[0])
                    record(lin, *payload[0])
            return out

        if scheme.hessian:
            by_node = {lin.node: lin for lin in todo}
            if ranks()[1] > 1:   # every process sees the same finished records before any is written
                import torch.distributed as dist
                dist.barrier()
            known = {lin.node for lin in todo if ctx.checkpoint and ctx.checkpoint.has(lin.weight)}
            calibrate_and_quantize(ir, list(by_node), ctx.calib[: c.samples], store_group, c.sequential, known,
                                   ctx.device)
        else:
            for lin in todo:
                store(lin)
        bar.close()
        if resumed:
            log.info("quantize-weights: %d of %d linears taken from the interrupted compile", len(resumed), len(todo))
        return stored, len(resumed), shares

    def _rewrite(self, ir, lin, q: Quantized):
        """linear(x, W, b) -> linear(x, op(packed tensors...), b); a sparse_add of outliers stays
        between the two (its values already absorb the dense error where they sit)."""
        user = next(iter(u for u in lin.weight_node.users if u is lin.node or lin.node in u.users))
        attrs = [ir.get_attr(name, user) if name is not None else None for name in q.tensors]
        ir.insert(q.format.op, (*attrs, *q.consts), before=user, typ=f"f32[{q.shape[0]},{q.shape[1]}]",
                  swap=(lin.weight_node, [user]))
        lin.node.meta[meta.QUANT] = {"method": self.config.method, **q.info, "shape": list(q.shape),
                                     "tensors": [n for n in q.tensors if n is not None],
                                     "bpw": round(8 * q.nbytes / (q.shape[0] * q.shape[1]), 4)}

    def _stats(self, todo, stored) -> dict:
        n_weights = n_bytes = partial = 0
        sqnrs, groups = {}, {}
        for lin in todo:
            q = stored[lin.node]
            sqnrs[lin.name] = q.sqnr_db
            if self.config.method == "finequant":
                groups[lin.name] = q.info["group"]
            n_weights += q.shape[0] * q.shape[1]
            n_bytes += q.nbytes
            g = q.info["group"]
            partial += g != -1 and q.shape[1] % g != 0
        vals = list(sqnrs.values())
        # experts: calibration rows each one received (GPTQ); those with none were rounded to nearest
        routed = {lin.name: stored[lin.node].info["expert_rows"] for lin in todo if "expert_rows" in stored[lin.node].info}
        stats = {"linears": len(todo), "weights": n_weights, "bits_per_weight": round(8 * n_bytes / n_weights, 4),
                 "partial_last_group": int(partial), "weight_sqnr_db_min": min(vals),
                 "weight_sqnr_db_mean": round(sum(vals) / len(vals), 2), "weight_sqnr_db": sqnrs}
        if groups:
            stats["groups"] = groups
        if routed:
            unseen = sum(r == 0 for rows in routed.values() for r in rows)
            stats.update(expert_rows=routed, experts_without_rows=unseen)
            if unseen:
                log.warning("quantize-weights: %d experts received no calibration rows and were rounded to nearest "
                            "(more calibration text reaches more of them)", unseen)
        return stats

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
        ir.set_tensor(lin.sparse[2], (w[rows, cols] - dense_hat[rows, cols]).to(torch.float16))
        return w, _plus_sparse(ir, lin, dense_hat)


def _plus_sparse(ir, lin, dense_hat: torch.Tensor) -> torch.Tensor:
    """The whole weight a split linear computes: its dense part plus its sparse values."""
    crow, col, val = (ir.tensor(t) for t in lin.sparse)
    w_hat = dense_hat.clone()
    w_hat[csr_rows(crow), col.long()] += val.float()
    return w_hat


def _sparse_mask(ir, lin) -> torch.Tensor:
    crow, col, _ = (ir.tensor(t) for t in lin.sparse)
    mask = torch.zeros(lin.rows, lin.in_features, dtype=torch.bool)
    mask[csr_rows(crow), col.long()] = True
    return mask
