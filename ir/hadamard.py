"""Hadamard matrices and the fast Walsh-Hadamard transform.

Supported sizes: n = 2^m, and n = K * 2^m for K in BASE_ORDERS (the sizes QuaRot handles). For
those, H_n = H_K kron H_{2^m} (Sylvester for the power of two). The base matrices of order K are
data (`hadamard_matrices.txt`: per order, one hex row per line, bit set = -1, first entry the
most significant bit), checked to satisfy H H^T = K I when loaded.

Conventions: rotations act on row vectors (x_rot = x @ Q); Q = H_n / sqrt(n) is orthogonal.
`lowbit.hadamard(x)` computes x @ Q along the last dim in O(n (m + K)) operations: a butterfly
over the 2^m factor and a K x K product for the base factor; never an n x n matmul."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

BASE_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
_DATA = Path(__file__).with_name("hadamard_matrices.txt")


@functools.cache
def _base_matrices() -> dict[int, torch.Tensor]:
    out, order, rows = {}, None, []
    for line in _DATA.read_text().split("\n"):
        line = line.strip()
        if line.startswith("order "):
            order, rows = int(line.split()[1]), []
            out[order] = rows
        elif line:
            bits = bin(int(line, 16))[2:].zfill(len(line) * 4)[:order]
            rows.append([-1.0 if b == "1" else 1.0 for b in bits])
    mats = {}
    for k, r in out.items():
        h = torch.tensor(r, dtype=torch.float64)
        if h.shape != (k, k) or not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
            raise RuntimeError(f"corrupt Hadamard data for order {k}")
        mats[k] = h
    return mats


def factor(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K * 2^m and K = 1 or a base order; None when unsupported."""
    if n < 1:
        return None
    p = n & -n   # largest power of two dividing n
    k = n // p
    if k == 1:
        return 1, p
    for base in BASE_ORDERS:   # K itself may carry powers of two (12 = 3 * 4)
        if n % base == 0 and (n // base) & (n // base - 1) == 0:
            return base, n // base
    return None


def supported(n: int) -> bool:
    return factor(n) is not None


def _check(n: int) -> tuple[int, int]:
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard matrix of order {n}: supported are 2^m and K*2^m for K in {BASE_ORDERS}")
    return f


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """Dense H_n (entries +-1, float64): the reference the fast transform is tested against."""
    k, p = _check(n)
    base = _base_matrices()[k] if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(base, _sylvester(p))


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Randomized orthogonal Hadamard Q = H_n diag(s) / sqrt(n), s random signs (float64)."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs / math.sqrt(n)


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Seeded random orthogonal matrix: QR of a Gaussian, signs fixed so it is Haar-distributed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ (H_n / sqrt(n)) along the last dim, without forming H_n."""
    n = x.shape[-1]
    k, p = _check(n)
    lead = x.shape[:-1]
    y = x.reshape(-1, k, p)
    h = 1
    while h < p:   # butterflies over the 2^m factor: H_p = H_2 kron ... kron H_2
        y = y.view(-1, k, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, :, 0] + y[:, :, :, 1], y[:, :, :, 0] - y[:, :, :, 1]), dim=3)
        h *= 2
    y = y.reshape(-1, k, p)
    if k > 1:      # (x @ (A kron B))[a, b] = sum_a' A[a', a] (x B)[a', b]
        y = torch.einsum("ca,rcb->rab", _base_matrices()[k].to(y.device, y.dtype), y)
    return (y / math.sqrt(n)).reshape(*lead, n)


def kron_split(n: int) -> tuple[int, int]:
    """(p, q) with n = p q for a Kronecker-factored rotation of order n: q the power-of-two part of
    n up to 256, p the rest (holding the base order)."""
    _, two = _check(n)
    q = min(two, 256)
    return n // q, q


def kron_hadamard(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), orthogonal, with A kron B = H_n / sqrt(n): where a learned Kronecker-factored
    rotation starts (float64)."""
    p, q = kron_split(n)
    k, _ = _check(n)
    base = _base_matrices()[k] if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(base, _sylvester(p // k)) / math.sqrt(p), _sylvester(q) / math.sqrt(q)


@torch.library.custom_op("lowbit::hadamard", mutates_args=())
def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Online Hadamard transform: x @ (H_n / sqrt(n)) along the last dimension."""
    return fwht(x)


@hadamard.register_fake
def _(x):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    x, = ctx.saved_tensors
    with torch.enable_grad():   # x -> x Q is linear: its vjp is grad Q^T, taken through fwht
        x = x.detach().requires_grad_()
        return torch.autograd.grad(fwht(x), x, grad)[0]


hadamard.register_autograd(_backward, setup_context=_setup)


def kron_rotate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x @ (A kron B) along the last dim (inverse: x @ (A kron B)^T), computed as A^T X B (A X B^T)
    on x viewed as [..., p, q]: p q (p + q) work per row, not n^2. Differentiable in A and B."""
    y = x.unflatten(-1, (len(a), len(b)))
    y = a @ y @ b.T if inverse else a.T @ y @ b
    return y.flatten(-2)


@torch.library.custom_op("lowbit::rotate_kron", mutates_args=())
def rotate_kron(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Online rotation by a Kronecker-factored orthogonal matrix: kron_rotate(x, A, B)."""
    return kron_rotate(x, a, b)


@rotate_kron.register_fake
def _(x, a, b):
    return torch.empty_like(x)


def _kron_backward(ctx, grad):
    a, b = ctx.saved_tensors   # the vjp of x -> x (A kron B) is grad (A kron B)^T
    return kron_rotate(grad, a, b, inverse=True), None, None


rotate_kron.register_autograd(_kron_backward, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[1:]))
