from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from lowbit.ir import meta
from lowbit.ir.quant import QuantSpec, dequantize, dequantize_codes, pack_weight, packed_from_codes

from .base import Lossy, Pass, PassContext, PassFailure, PassResult, register
from .gptq import calibrate_and_quantize, gptq
from .instruments import sqnr_db

# Minimum logits SQNR the numeric-diff instrument holds a weight quantizer to, by bits: a
# floor well under what RTN measures on stories260K and SmolLM2 (see tests), to catch breakage
# (wrong scales, wrong packing order), not to grade quality.
_MIN_SQNR_DB = {2: -10.0, 3: 0.0, 4: 5.0, 5: 10.0, 6: 15.0, 7: 20.0, 8: 25.0}


@register
class QuantizeWeights(Pass):
    """Quantize linear weights group-wise to packed integers (method=rtn|gptq), dequantized by lowbit.dequantize."""
    name = "quantize-weights"

    @dataclass(frozen=True)
    class Config:
        method: str = "rtn"
        bits: int = 4
        group: int = 128
        sym: bool = True
        clip: bool = False      # MSE search of a per-group clipping ratio
        lm_head: bool = False   # also quantize the output projection
        # gptq: dampening (fraction of mean diag H), column order by decreasing H diagonal with
        # static groups, inputs from already-quantized layers, calibration windows used
        damp: float = 0.01
        act_order: bool = True
        sequential: bool = True
        samples: int = 64

        def __post_init__(self):
            if self.method not in ("rtn", "gptq"):
                raise ValueError(f"method '{self.method}' is not available (available: rtn, gptq)")
            QuantSpec(self.bits, self.group, self.sym)

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
            if not torch.isfinite(ir.tensor(lin.node.args[1].target)).all():
                raise PassFailure(f"weight '{lin.node.args[1].target}' has NaN or Inf", lin.node)
        bar = tqdm(total=len(todo), desc=f"quantize-weights ({c.method})", unit="linear",
                   disable=not ctx.progress, leave=False)
        packs = {}
        if c.method == "rtn":
            for lin in todo:
                packs[lin.node] = pack_weight(ir.tensor(lin.node.args[1].target), spec, clip_search=c.clip)
                bar.update()
        else:
            if ctx.calib is None:
                raise PassFailure("method=gptq needs calibration text (compile --calib FILE)")

            def quantize(node, w, h):
                codes, scale, zero = gptq(w, h, spec, c.damp, c.act_order)
                packs[node] = packed_from_codes(codes, scale, zero, spec)
                bar.update()
                return dequantize_codes(codes, scale, zero, spec)
            calibrate_and_quantize(ir.gm, [lin.node for lin in todo], ctx.calib[: c.samples], quantize, c.sequential)
        bar.close()
        n_weights = n_bytes = partial = 0
        sqnrs = {}
        for lin in todo:
            w_node = lin.node.args[1]
            w = ir.tensor(w_node.target)
            packed = packs[lin.node]
            base = (lin.module or lin.node.name) + ".q"
            names = {"qweight": packed.qweight, "scales": packed.scales, "zeros": packed.zeros}
            for key, t in names.items():
                if t is not None:
                    ir.set_tensor(f"{base}.{key}", t)
            # rewrite: linear(x, W, b) -> linear(x, dequantize(qweight, scales, zeros, ...), b)
            with ir.graph.inserting_before(lin.node):
                attrs = [ir.get_attr(f"{base}.{k}", before=lin.node) if names[k] is not None else None
                         for k in ("qweight", "scales", "zeros")]
                deq = ir.graph.call_function(torch.ops.lowbit.dequantize.default,
                                             (*attrs, c.bits, c.group, packed.in_features))
            deq.meta[meta.TYPE] = f"f32[{w.shape[0]},{w.shape[1]}]"
            ir.stamp(deq, like=None)
            lin.node.replace_input_with(w_node, deq)
            bpw = 8 * packed.nbytes() / w.numel()
            lin.node.meta[meta.QUANT] = {"method": c.method, "bits": c.bits, "group": c.group,
                                         "sym": c.sym, "bpw": round(bpw, 4)}
            w_hat = dequantize(packed.qweight, packed.scales, packed.zeros, c.bits, c.group, packed.in_features)
            sqnrs[lin.name] = round(sqnr_db(w, w_hat), 2)
            n_weights += w.numel()
            n_bytes += packed.nbytes()
            partial += c.group != -1 and w.shape[1] % c.group != 0
        ir.remove_dead()
        ir.changed()
        vals = list(sqnrs.values())
        return PassResult(True, {
            "linears": len(todo), "weights": n_weights, "bits_per_weight": round(8 * n_bytes / n_weights, 4),
            "partial_last_group": int(partial), "weight_sqnr_db_min": min(vals),
            "weight_sqnr_db_mean": round(sum(vals) / len(vals), 2), "weight_sqnr_db": sqnrs})
