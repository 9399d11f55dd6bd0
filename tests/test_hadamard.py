import math

import pytest
import torch

from lowbit.ir.hadamard import (BASE_ORDERS, factor, fwht, hadamard, hadamard_matrix, kron_hadamard, random_hadamard,
                                random_orthogonal, rotate_kron)

# every stored base order and a few of Paley's (44 = 43 + 1, 76 = 2(37 + 1), 148 = 2(73 + 1),
# 284 = 283 + 1) alone and with powers of two, and the sizes of the two real models (dense
# references are O(n^3): sizes stay at or under 4096)
SIZES = [1, 2, 4, 8, 64, 1024, 4096] + [k * p for k in (*BASE_ORDERS, 44, 76, 148, 284) for p in (1, 2, 8)] \
    + [576, 1536]


@pytest.mark.parametrize("n", SIZES)
def test_orthogonal_and_fast_matches_dense(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h / math.sqrt(n), atol=1e-10)
    y = torch.randn(2, n)   # the op, float32: orthogonal, so norms are kept
    assert torch.allclose(hadamard(y).norm(dim=-1), y.norm(dim=-1), rtol=1e-5)


def test_fast_transform_is_not_a_dense_matmul():
    """O(n log n): the op never builds an n x n matrix (at most the K x K base)."""
    n = 172 * 64
    allocated = []
    orig = torch.kron
    torch.kron = lambda *a: allocated.append(a) or orig(*a)
    try:
        fwht(torch.randn(2, n))
    finally:
        torch.kron = orig
    assert allocated == []


def test_unsupported_sizes():
    for n in (1031, 1031 * 64, 0):   # odd part above MAX_BASE_ORDER
        assert factor(n) is None


@pytest.mark.parametrize("n", [3, 6, 92, 116, 232])
def test_orthogonal_fallback_where_no_hadamard_exists(n):
    """No Hadamard order divides these with a power-of-two quotient: the base is the odd part,
    a scaled random orthogonal matrix; H_n / sqrt(n) stays orthogonal and fast."""
    k, p = factor(n)
    assert k * p == n and k % 2 == 1
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=torch.float64), atol=1e-8)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ h / math.sqrt(n), atol=1e-10)


def test_real_widths_outside_quarots_list():
    """Qwen2.5-0.5B's 4864, 1.5B's 8960, 3B's 11008, 7B's 18944, TinyLlama's 5632, Falcon-7B's 4544:
    each a known base order times a power of two (the smallest such order)."""
    assert {n: factor(n) for n in (4864, 9728, 8960, 18944, 5632, 2816, 4544)} == {
        4864: (76, 64), 9728: (76, 128), 8960: (140, 64), 18944: (148, 128), 5632: (44, 128), 2816: (44, 64),
        4544: (284, 16)}
    with pytest.raises(ValueError, match="no Hadamard transform of order 1031: its odd part is above 1024"):
        hadamard_matrix(1031)


@pytest.mark.parametrize("make", [random_hadamard, random_orthogonal])
def test_random_rotations_orthogonal_and_seeded(make):
    q = make(576, 3)
    assert torch.allclose(q @ q.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, make(576, 3)) and not torch.equal(q, make(576, 4))


@pytest.mark.parametrize("n", [64, 172, 576, 1536, 11008])
def test_kron_rotation_starts_at_hadamard_and_matches_dense(n):
    """lowbit.rotate_kron(x, A, B) is x @ (A kron B); kron_hadamard's factors give H_n / sqrt(n), and
    the op's gradient is the transposed product (what learning R4 and the online op rely on)."""
    a, b = kron_hadamard(n)
    assert len(a) * len(b) == n and len(b) <= 256
    assert torch.allclose(torch.kron(a, b), hadamard_matrix(n) / math.sqrt(n), atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, requires_grad=True)
    qa, qb = random_orthogonal(len(a), 0), random_orthogonal(len(b), 1)
    y = rotate_kron(x, qa, qb)
    assert torch.allclose(y, x @ torch.kron(qa, qb), atol=1e-10)
    assert torch.allclose(rotate_kron(x, a, b), fwht(x), atol=1e-10)
    g = torch.randn_like(y)
    assert torch.allclose(torch.autograd.grad(y, x, g)[0], g @ torch.kron(qa, qb).T, atol=1e-10)
