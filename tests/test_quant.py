"""ir/quant.py: per-token dynamic quantization (lowbit.quantize_tokens) and its LSQ gradient."""
import pytest
import torch

from lowbit.ir.quant import quantize_tokens, quantize_tokens_lsq


@pytest.mark.parametrize("bits,group,sym", [(8, -1, False), (4, -1, False), (4, 16, True), (8, 32, True)])
def test_quantize_tokens_grid_and_error(bits, group, sym):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(bits)) * 3
    y = quantize_tokens(x, bits, group, sym, 1.0)
    g = 64 if group == -1 else group
    xg, yg = x.reshape(2, 5, -1, g), y.reshape(2, 5, -1, g)
    steps = 2 ** bits - 1 if not sym else 2 ** (bits - 1) - 1
    scale = (xg.abs().amax(-1, keepdim=True) if sym else
             xg.amax(-1, keepdim=True).clamp(min=0) - xg.amin(-1, keepdim=True).clamp(max=0)) / steps
    # every output sits on its group's integer grid, within half a step of the input
    assert (yg - xg).abs().max() <= (scale / 2 + 1e-6).max()
    k = yg / scale    # (code - integer zero point): an integer either way
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert len(torch.unique(yg[0, 0, 0])) <= 2 ** bits


def test_clip_shrinks_the_range():
    x = torch.linspace(-1, 1, 64).expand(3, 64)
    y = quantize_tokens(x, 4, -1, True, 0.5)
    # scale 0.5 / 7: codes -8..7 reach [-8/14, 0.5]
    assert y.max() <= 0.5 + 1e-6 and y.min() >= -0.5 * 8 / 7 - 1e-6 and torch.equal(y[0], y[1])


def test_lsq_gradient_sees_the_ranges():
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    y = quantize_tokens_lsq(x, 4, -1, False, 0.9)
    assert torch.equal(y, quantize_tokens(x, 4, -1, False, 0.9))   # the same values
    # the squared rounding error: zero gradient when rounding is only passed straight through;
    # through the ranges it is nonzero, and a small step against it lowers the error
    err = lambda q, v: (q(v, 4, -1, False, 0.9) - v).pow(2).sum()
    g_ste, = torch.autograd.grad(err(quantize_tokens, x), x)
    g_lsq, = torch.autograd.grad(err(quantize_tokens_lsq, x), x)
    assert g_ste.abs().max() == 0 and g_lsq.abs().max() > 0
    with torch.no_grad():
        assert err(quantize_tokens, x - 1e-3 * g_lsq) < err(quantize_tokens, x)
