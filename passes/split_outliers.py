from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.ir import meta
from lowbit.ir.formats.sparse import sparse_add, to_csr

from .base import Exact, Pass, PassContext, PassFailure, PassResult, register
from .sensitivity import fisher


@register
class SplitOutliers(Pass):
    """Dense-and-sparse (SqueezeLLM): move each linear's most sensitive and largest weights to a CSR matrix (fp16 values)."""
    name = "split-outliers"
    applications = "each linear, by its path (`layers.3.mlp.down_proj`)"
    after = ("fuse-rotations", "insert-hadamard", "scale-channels", "shape-noise")

    @dataclass(frozen=True)
    class Config:
        fraction: float = 0.0045   # share of each matrix's values moved to the sparse part, of which
        sensitive: float = 0.0005  # this share by Fisher information (needs calibration), the rest by magnitude
        samples: int = 64          # calibration windows for the Fisher information (as quantize-weights)
        lm_head: bool = False

        def __post_init__(self):
            if not 0 <= self.sensitive <= self.fraction < 0.5:
                raise ValueError("need 0 <= sensitive <= fraction < 0.5")

    def contract(self):
        # W = D + S holds exactly: S keeps fp16 values and D keeps what fp16 rounding left behind.
        return Exact(1e-6)

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        s = ir.linears   # no other structure: any captured model's linears
        todo = [lin for lin in s.linears.values() if (c.lm_head or lin is not s.lm_head) and ctx.applies(lin.path)]
        if any(lin.frozen for lin in todo) or not todo or c.fraction == 0:
            if any(lin.quantized for lin in todo):
                raise PassFailure("linears are already quantized; split-outliers must come before quantize-weights")
            return PassResult(False, {"already": any(lin.sparse for lin in todo)})
        fish = fisher(ir, ctx, c.samples) if c.sensitive > 0 else {}
        nnz = total = 0
        for lin in todo:
            w = ir.tensor(lin.weight).float().reshape(lin.rows, -1)   # experts: their rows stacked
            if not torch.isfinite(w).all():
                raise PassFailure(f"weight '{lin.weight}' has NaN or Inf", lin.node)
            mask = torch.zeros(w.numel(), dtype=torch.bool)
            if c.sensitive > 0:   # the most sensitive values first, then the largest of the rest
                mask[fish[lin.node.name].flatten().topk(round(c.sensitive * w.numel())).indices] = True
            mag = w.abs().flatten().masked_fill(mask, -1.0)
            mask[mag.topk(round((c.fraction - c.sensitive) * w.numel())).indices] = True
            mask = mask.view_as(w)
            crow, col, val = to_csr(mask, w)
            dense = w.clone()
            dense[mask] -= val.float()   # boolean indexing is row-major, the order of CSR values
            base = lin.home + ".sparse"
            names = {"dense": dense, "crow": crow, "col": col, "val": val}
            attrs = [ir.param(f"{base}.{k}", t, lin.node) for k, t in names.items()]
            ir.insert(sparse_add._opoverload, attrs, before=lin.node, swap=(lin.weight_node, [lin.node]),
                      typ=lin.weight_node.meta.get(meta.TYPE, f"f32[{w.shape[0]},{w.shape[1]}]"))
            lin.node.meta[meta.SPARSE] = {"nnz": int(mask.sum()), "tensors": [f"{base}.{k}" for k in ("crow", "col", "val")]}
            nnz += int(mask.sum())
            total += w.numel()
        ir.remove_dead()
        ir.changed()
        crow_bytes = 4 * sum(lin.rows + 1 for lin in todo)
        return PassResult(True, {"linears": len(todo), "nnz": nnz, "density": round(nnz / total, 6),
                                 "sparse_bits_per_weight": round(8 * (6 * nnz + crow_bytes) / total, 4)})
