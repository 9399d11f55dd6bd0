from __future__ import annotations

from dataclasses import dataclass

from .base import Exact, Pass, PassContext, PassResult, register


@register
class FoldNorms(Pass):
    """Fold RMSNorm scales (w, or 1+w for Gemma) into the linears they feed; norms become pure normalizations."""
    name = "fold-norms"

    @dataclass(frozen=True)
    class Config:
        pass

    def contract(self):
        return Exact(1e-4)

    def run(self, ir, ctx: PassContext) -> PassResult:
        s = ir.analysis
        folded, untied, skipped = [], [], {}
        # find: norms that still carry a scale; check: every user is a linear reading it as input
        for norm in s.norms:
            if norm.weight is None:
                continue
            if norm.other_users or not norm.consumers:
                what = norm.other_users[0] if norm.other_users else None
                skipped[norm.name] = (f"output feeds '{what.name}' ({what.target}), not a linear" if what
                                      else "no linear reads it")
                continue
            if any(lin.frozen for lin in norm.consumers):
                skipped[norm.name] = "a linear it feeds is already quantized or split into dense + sparse"
                continue
            # rewrite: W' = W diag(scale), computed in float64
            scale = ir.tensor(norm.weight).double() + norm.offset
            for lin in norm.consumers:
                w_node = lin.node.args[1]
                w = ir.tensor(w_node.target).double() * scale
                if len(w_node.users) > 1:   # tied (lm_head and embedding) or shared: untie this reader
                    target = f"{lin.home}.weight.folded"
                    lin.node.replace_input_with(w_node, ir.param(target, w.float(), lin.node))
                    untied.append(lin.name)
                else:
                    ir.set_tensor(w_node.target, w.float())
            norm.output.replace_all_uses_with(norm.normalized)
            folded.append(norm.name)
        if not folded:
            return PassResult(False, {"skipped": skipped})
        ir.remove_dead()
        ir.changed()
        return PassResult(True, {"folded": len(folded), "untied": untied, "skipped": skipped})
