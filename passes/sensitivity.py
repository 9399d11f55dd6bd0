"""Weight sensitivity for SqueezeLLM and split-outliers: the diagonal of the Fisher information,
estimated as the sum over calibration sequences of the squared gradient of each sequence's mean
next-token loss (SqueezeLLM, Kim et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .base import PassContext, PassFailure, all_sum, my_share


def fisher(ir, ctx: PassContext, samples: int) -> dict[str, torch.Tensor]:
    """{linear node name: F [N, K] float32 (an expert stack's rows stacked)} for every linear with an unquantized weight,
    computed once per compile on the weights as they are when first asked (later passes share it).
    Gradients flow through lowbit.sparse_add, so a weight already split still gets its Fisher."""
    key = ("fisher", samples)
    if key in ir.scratch:
        return ir.scratch[key]
    if ctx.calib is None:
        raise PassFailure("needs calibration text for the Fisher information (compile --calib FILE)")
    ir.whole("the Fisher information (gradients of the loss)")
    lins = [lin for lin in ir.linears.linears.values() if not lin.quantized]
    params = {lin.weight: ir.tensor(lin.weight).detach().float().requires_grad_() for lin in lins}
    acc = {t: torch.zeros_like(p) for t, p in params.items()}
    seqs = my_share(ctx.calib[:samples])   # with several processes: a share each, the sums added
    for ids in tqdm(seqs, desc="fisher information", unit="seq", disable=not ctx.progress, leave=False):
        logits = torch.func.functional_call(ir.gm, params, (ids[None],))
        loss = F.cross_entropy(logits[0, :-1], ids[1:])
        grads = torch.autograd.grad(loss, list(params.values()))
        for t, g in zip(params, grads):
            acc[t] += g.square()
    ir.scratch[key] = {lin.node.name: all_sum(acc[lin.weight]).reshape(lin.rows, -1) for lin in lins}
    return ir.scratch[key]
