from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.ir.analysis import find_norms

from .base import Exact, Pass, PassContext, PassResult, by_rows, in_float64, register


@register
class FoldNorms(Pass):
    """Fold norm scales (RMSNorm's w, or 1+w for Gemma; LayerNorm's weight and bias) into the linears they feed; norms become pure normalizations."""
    name = "fold-norms"
    applications = "each norm with a scale or shift, by its weight's path (`layers.3.input_layernorm.weight`)"
    changes_basis = True

    @dataclass(frozen=True)
    class Config:
        pass

    def contract(self):
        return Exact(1e-4)

    def run(self, ir, ctx: PassContext) -> PassResult:
        # needs only each norm and the linears reading it: works on any captured graph
        norms = find_norms(ir, ir.linears.linears)
        folded, untied, skipped = [], [], {}
        # find: norms that still carry a scale or shift; check: every user is a linear reading it as input
        for norm in norms:
            if (norm.weight is not None or norm.bias is not None) and not ctx.applies(norm.path):
                continue
            if self._into_table(ir, norm):
                folded.append(norm.name)
                continue
            if norm.weight is None and norm.bias is None:
                continue
            if norm.bias is not None and any(lin.experts for lin in norm.consumers):
                skipped[norm.name] = "a LayerNorm's shift cannot fold into experts (a grouped linear has no bias)"
                continue
            if norm.other_users or not norm.consumers:
                what = norm.other_users[0] if norm.other_users else None
                skipped[norm.name] = (f"output feeds '{what.name}' ({what.target}), not a linear" if what
                                      else "no linear reads it")
                continue
            if any(lin.frozen for lin in norm.consumers):
                skipped[norm.name] = "a linear it feeds is already quantized or split into dense + sparse"
                continue
            for lin in norm.consumers:
                untied += self._fold_into(ir, norm, lin)
            if norm.kind == "layer":   # layer_norm(x, shape, w, b, eps) -> layer_norm(x, shape, None, None, eps)
                norm.output.args = (*norm.output.args[:2], None, None, *norm.output.args[4:])
            else:
                norm.output.replace_all_uses_with(norm.normalized)
            folded.append(norm.name)
        if not folded:
            return PassResult(False, {"skipped": skipped})
        ir.remove_dead()
        ir.changed()
        return PassResult(True, {"folded": len(folded), "untied": untied, "skipped": skipped})

    @staticmethod
    def _into_table(ir, norm) -> bool:
        """A norm reading only an embedding lookup (BLOOM's word_embeddings_layernorm) is a function
        of the token alone: the table becomes its rows normalized (scale and shift included, in
        float64), read by the lookup in place of the norm (a copy if the table is also read
        elsewhere, a tied lm_head)."""
        emb = norm.input
        if not (emb.target is torch.ops.aten.embedding.default and emb.args[0].op == "get_attr"
                and all(u is norm.normalized or u.target is torch.ops.aten.pow.Tensor_Scalar for u in emb.users)):
            return False
        t = ir.tensor(emb.args[0].target).double()
        w = ir.tensor(norm.weight).double() + norm.offset if norm.weight else None
        b = ir.tensor(norm.bias).double() if norm.bias else None
        if norm.kind == "layer":
            t = torch.nn.functional.layer_norm(t, t.shape[-1:], w, b, norm.eps)
        else:
            t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + norm.eps) * (1 if w is None else w)
        table = emb.args[0]
        if len(table.users) > 1:
            emb.replace_input_with(table, ir.param(f"{table.target.rsplit('.', 1)[0]}.normed", t.float(), emb))
        else:
            ir.set_tensor(table.target, t.float())
        norm.output.replace_all_uses_with(emb)
        return True

    @staticmethod
    def _fold_into(ir, norm, lin) -> list[str]:
        """W (n g + b) + c = (W diag(g)) n + (c + W b), computed in float64. A weight or bias that
        other nodes read too (a tied lm_head) gets its own folded copy; returns the linears untied."""
        w_node = lin.node.args[1]
        scale = ir.tensor(norm.weight).double() + norm.offset if norm.weight else torch.ones(())

        def fold(w):   # by rows: a vocabulary-sized lm_head is never whole in float64
            return in_float64(by_rows(lambda x: x * scale), w)
        shift = ir.tensor(w_node.target).double() @ ir.tensor(norm.bias).double() if norm.bias is not None else None
        untied = []
        if len(w_node.users) > 1:   # tied (lm_head and embedding) or shared: untie this reader
            lin.node.replace_input_with(w_node, ir.param(f"{lin.home}.weight.folded", fold(ir.tensor(w_node.target)),
                                                         lin.node))
            untied.append(lin.name)
        else:
            ir.rewrite(w_node.target, fold)   # a weight left on disk is folded when it is read
        if shift is None:
            return untied
        b_node = lin.node.args[2] if len(lin.node.args) > 2 else None
        if b_node is not None and len(b_node.users) == 1:
            ir.set_tensor(b_node.target, (ir.tensor(b_node.target).double() + shift).float())
        else:
            old = ir.tensor(b_node.target).double() if b_node is not None else 0
            new = ir.param(f"{lin.home}.bias.folded", (old + shift).float(), lin.node)
            lin.node.args = (*lin.node.args[:2], new, *lin.node.args[3:])
        return untied
