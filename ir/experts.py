"""Mixture-of-experts weights: one grouped linear per expert stack.

A capture turns an MoE layer's grouped matmul (transformers' `grouped_mm_fallback`, or
`aten._grouped_mm`, over the transposed expert weights) into `lowbit.grouped_linear(x, W, offsets)`:
x [T, K] holds the rows routed to the experts, sorted by expert; offsets [E] is where each
expert's rows end (a cumulative count); W is [E, N, K], each expert's weight in a linear's
[out, in] layout, or [E*N, K], the same rows stacked (a quantized weight's reference op makes that
shape). Row r gets x[r] @ W[e(r)]^T. Weight passes treat the stack as E linears of [N, K] that
share one graph node: per-row formats quantize it as one [E*N, K] matrix; GPTQ takes each
expert's Hessian from its own rows."""
from __future__ import annotations

import torch


def expert_rows(offsets: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of each expert's rows."""
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def _grouped(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    w = w.reshape(offsets.shape[0], -1, w.shape[-1])
    parts = [x[s:e] @ w[i].T for i, (s, e) in enumerate(expert_rows(offsets))]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1])


@torch.library.custom_op("lowbit::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ W[e]^T for the rows r of expert e (rows sorted by expert, offsets: their ends)."""
    return _grouped(x, w, offsets)


@grouped_linear.register_fake
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.numel() // (offsets.shape[0] * w.shape[-1]))


def _backward(ctx, grad):
    x, w, offsets = ctx.saved_tensors
    with torch.enable_grad():
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        gx, gw = torch.autograd.grad(_grouped(x, w, offsets), (x, w), grad)
    return gx, gw, None


grouped_linear.register_autograd(_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs))


def grouped_ops() -> tuple:
    """The grouped matmuls a capture rewrites: (x [T, K], W^T [E, K, N], offsets [E]) -> [T, N]."""
    ops = [torch.ops.aten._grouped_mm.default] if hasattr(torch.ops.aten, "_grouped_mm") else []
    if hasattr(torch.ops, "transformers") and hasattr(torch.ops.transformers, "grouped_mm_fallback"):
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    return tuple(ops)
