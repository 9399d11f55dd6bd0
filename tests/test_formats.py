"""The packed layout and the RTN math (property-based)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.ir.formats import pack, unpack
from lowbit.ir.formats.uniform import QuantSpec, dequantize, dequantize_codes, fit_groups, pack_weight, quantize


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 9), k=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(bits, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.int32)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (n, math.ceil(k * bits / 8))
    assert torch.equal(unpack(packed, bits, k), codes)


def test_pack_layout_is_little_endian_bit_stream():
    # 4 bits: code 2j is the low nibble of byte j; 3 bits: codes run across byte boundaries
    assert pack(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x21, 0x03]]
    assert pack(torch.tensor([[5, 6, 7]]), 3).tolist() == [[5 | 6 << 3 | (7 & 3) << 6, 7 >> 2]]


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([-1, 8, 16, 32, 7]), sym=st.booleans(),
       k=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_rtn_error_within_half_step(bits, group, sym, k, seed):
    """Every weight reconstructs within half a quantization step of its group (plus fp16 scale
    rounding), also when K is not a multiple of the group size."""
    spec = QuantSpec(bits, group, sym)
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(seed))
    p = pack_weight(w, spec)
    t = p.tensors
    w_hat = dequantize(t["qweight"], t["scales"], t["zeros"], bits, group, k)
    assert torch.equal(w_hat, p.w_hat())
    assert w_hat.shape == w.shape and t["scales"].shape == (6, spec.n_groups(k))
    cols = torch.arange(k) // spec.group_size(k)   # column by column, as the layout defines it
    zero = 1 << (bits - 1) if sym else unpack(t["zeros"], bits, spec.n_groups(k)).float()[:, cols]
    assert torch.equal(w_hat, (unpack(t["qweight"], bits, k).float() - zero) * t["scales"].float()[:, cols])
    step = t["scales"].float()[:, cols]
    assert ((w - w_hat).abs() <= step * 0.5 + 1e-3 * w.abs().max()).all()


def test_symmetric_has_no_zero_points_and_asymmetric_packs_them():
    w = torch.randn(4, 64)
    assert pack_weight(w, QuantSpec(4, 32, True)).tensors["zeros"] is None
    z = pack_weight(w, QuantSpec(4, 32, False)).tensors["zeros"]
    assert z.dtype == torch.uint8 and z.shape == (4, 1)


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([-1, 32, 7]), k=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_group_minimum_grid(bits, group, k, seed):
    """offset=min (llama.cpp's Q4_1 encoding): an fp16 minimum per group, codes over [min, max]
    (not widened to hold 0), W_hat = code * scale + min in float32; every weight within half a step."""
    spec = QuantSpec(bits, group, False, "min")
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(seed)) + 3   # all positive: 0 is outside the range
    p = pack_weight(w, spec)
    t = p.tensors
    cols = torch.arange(k) // spec.group_size(k)
    assert t["zeros"].dtype == torch.float16 and t["zeros"].shape == t["scales"].shape and p.info["offset"] == "min"
    codes = unpack(t["qweight"], bits, k).float()
    want = codes * t["scales"].float()[:, cols] + t["zeros"].float()[:, cols]
    assert torch.equal(dequantize(t["qweight"], t["scales"], t["zeros"], bits, group, k), want)
    step = t["scales"].float()[:, cols]
    assert ((w - want).abs() <= step * 0.5 + 2e-3 * w.abs().max()).all()
    group_min = torch.stack([w[:, cols == g].amin(1) for g in range(spec.n_groups(k))], 1)
    assert torch.equal(t["zeros"], group_min.half())   # each group starts at its own minimum


@settings(max_examples=30, deadline=None)
@given(bits=st.integers(2, 8), group=st.sampled_from([-1, 32, 7]), k=st.integers(2, 80), seed=st.integers(0, 2**16))
def test_signed_symmetric_grid(bits, group, k, seed):
    """offset=signed (llama.cpp's Q4_0 rule): each group's scale is its signed extreme over
    -2^(bits-1), so that weight lands on code 0 exactly and every code is in reach; the scale is
    negative where the extreme is positive; the layout is the plain symmetric one."""
    spec = QuantSpec(bits, group, True, "signed")
    w = torch.randn(5, k, generator=torch.Generator().manual_seed(seed))
    p = pack_weight(w, spec)
    t = p.tensors
    assert t["zeros"] is None and "offset" not in p.info
    codes = unpack(t["qweight"], bits, k)
    cols = torch.arange(k) // spec.group_size(k)
    for g in range(spec.n_groups(k)):
        wg = w[:, cols == g]
        at = wg.abs().argmax(1)
        extreme = wg.gather(1, at[:, None])[:, 0]
        assert torch.equal(t["scales"][:, g], (extreme / -(1 << (bits - 1))).half())
        assert (codes[:, cols == g].gather(1, at[:, None]) == 0).all()
    step = t["scales"].float().abs()[:, cols]
    w_hat = p.w_hat()
    inside = w.abs() <= (((1 << (bits - 1)) - 1) * step)   # the far side reaches 2^(bits-1) - 1 steps
    assert ((w - w_hat).abs()[inside] <= (step * 0.5 + 2e-3 * w.abs().max())[inside]).all()


def test_signed_grid_lowers_error_on_gaussian_weights():
    """One more code than max|x| / 7: less squared error at 4 bits, with and without clipping."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    err = {}
    for offset in ("zero", "signed"):
        for clip in (False, True):
            spec = QuantSpec(4, 32, True, offset)
            s, z = fit_groups(w, spec, clip_search=clip)
            err[offset, clip] = (dequantize_codes(quantize(w, s, z, spec), s, z, spec) - w).pow(2).mean().item()
    assert err["signed", False] < 0.85 * err["zero", False] and err["signed", True] < 0.95 * err["zero", True]


def test_clip_search_never_worse_than_minmax():
    w = torch.randn(16, 256) ** 3   # heavy tails: clipping pays
    for bits in (3, 4):
        spec = QuantSpec(bits, 64, False)
        errs = []
        for clip in (False, True):
            s, z = fit_groups(w, spec, clip_search=clip)
            codes = quantize(w, s, z, spec)
            w_hat = (codes.double().view(16, 4, 64) - z[..., None]) * s[..., None]
            errs.append((w_hat.view(16, 256) - w.double()).pow(2).sum().item())
        assert errs[1] < errs[0]


def test_bad_spec_rejected():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(9, 128, True)
    with pytest.raises(ValueError, match="group"):
        QuantSpec(4, 0, True)
    with pytest.raises(ValueError, match="sym=false"):
        QuantSpec(4, 32, True, "min")
    with pytest.raises(ValueError, match="sym=true"):
        QuantSpec(4, 32, False, "signed")
