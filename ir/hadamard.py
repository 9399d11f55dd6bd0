"""Hadamard matrices and the fast Walsh-Hadamard transform.

Supported sizes: n = 2^m, and n = K * 2^m where a base matrix of order K is known:
- the orders QuaRot ships (BASE_ORDERS), stored as data (`hadamard_matrices.txt`: per order, one
  hex row per line, bit set = -1, first entry the most significant bit);
- Paley's constructions over a prime field GF(q): order q + 1 for q = 3 (mod 4), order 2(q + 1)
  for q = 1 (mod 4). They reach the widths real models use outside QuaRot's list: 4864 and 9728
  (76 = 2(37 + 1)), 18944 (148 = 2(73 + 1)), 5632 and 2816 (44 = 43 + 1), 4544 (284 = 283 + 1).
Then H_n = H_K kron H_{2^m} (Sylvester for the power of two); K is the smallest such order, and
every base matrix is checked to satisfy H H^T = K I when made.

Where no Hadamard order K divides n that way (odd part 23, 29, ...: n = 92 * 2^m, 116 * 2^m,
...), the base is the odd part K itself with sqrt(K) times a seeded random orthogonal K x K matrix
(seed K) in place of H_K: H_n H_n^T = n I still holds, so H_n / sqrt(n) is orthogonal and every
user (fused rotations, the online transform, its ONNX form and CUDA kernel) works unchanged; the
entries are no longer +-1. Online it costs K + m multiply-adds per element, as a Hadamard base
does. Odd parts above MAX_BASE_ORDER are refused (the base product would be too dense).

Conventions: rotations act on row vectors (x_rot = x @ Q); Q = H_n / sqrt(n) is orthogonal.
`lowbit.hadamard(x)` computes x @ Q along the last dim in O(n (m + K)) operations: a butterfly
over the 2^m factor and a K x K product for the base factor; never an n x n matmul."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

BASE_ORDERS = (12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)
MAX_BASE_ORDER = 1024   # a larger base costs too much per element online
_DATA = Path(__file__).with_name("hadamard_matrices.txt")


@functools.cache
def _stored_matrices() -> dict[int, torch.Tensor]:
    out, order, rows = {}, None, []
    for line in _DATA.read_text().split("\n"):
        line = line.strip()
        if line.startswith("order "):
            order, rows = int(line.split()[1]), []
            out[order] = rows
        elif line:
            bits = bin(int(line, 16))[2:].zfill(len(line) * 4)[:order]
            rows.append([-1.0 if b == "1" else 1.0 for b in bits])
    return {k: _checked(torch.tensor(r, dtype=torch.float64), k) for k, r in out.items()}


def _checked(h: torch.Tensor, k: int, exact: bool = True) -> torch.Tensor:
    eye = k * torch.eye(k, dtype=torch.float64)
    if h.shape != (k, k) or not (torch.equal(h @ h.T, eye) if exact else torch.allclose(h @ h.T, eye, atol=1e-9)):
        raise RuntimeError(f"not a Hadamard matrix of order {k}")
    return h


def _prime(q: int) -> bool:
    return q > 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_prime(k: int) -> int | None:
    """q when Paley's construction I (k = q + 1, q = 3 mod 4) or II (k = 2(q + 1), q = 1 mod 4) over
    the prime field GF(q) gives order k."""
    if _prime(k - 1) and (k - 1) % 4 == 3:
        return k - 1
    if k % 2 == 0 and _prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return k // 2 - 1
    return None


def _paley(k: int) -> torch.Tensor:
    q = _paley_prime(k)
    squares = {x * x % q for x in range(1, q)}
    idx = torch.arange(q)
    diff = (idx[None, :] - idx[:, None]) % q   # Jacobsthal matrix Q[i, j] = chi(j - i)
    jac = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)[diff]
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[1:, 1:] = jac
    c[0, 1:] = 1
    if k == q + 1:           # I: Q is skew; H = I + [[0, 1], [-1, Q]]
        c[1:, 0] = -1
        return c + torch.eye(k, dtype=torch.float64)
    c[1:, 0] = 1             # II: the symmetric conference matrix C; H = C kron H2' + I kron H2''
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), torch.tensor([[1.0, -1.0], [-1.0, -1.0]],
                                                                                          dtype=torch.float64))


def _known(k: int) -> bool:
    return k in _stored_matrices() or _paley_prime(k) is not None


@functools.cache
def base_matrix(k: int) -> torch.Tensor:
    """The base matrix of order k (float64, B B^T = k I): a stored or Paley Hadamard matrix (+-1
    entries), or for an odd k, sqrt(k) times a random orthogonal matrix seeded with k."""
    stored = _stored_matrices()
    if k in stored:
        return stored[k]
    if _paley_prime(k) is not None:
        return _checked(_paley(k), k)
    return _checked((random_orthogonal(k, seed=k) * math.sqrt(k)).contiguous(), k, exact=False)


def factor(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K * 2^m and K = 1, the smallest Hadamard base order, or the odd part of n
    (the random orthogonal fallback); None when unsupported."""
    if n < 1:
        return None
    p = n & -n   # largest power of two dividing n
    if p == n:
        return 1, p
    k = (n // p) * 4   # a Hadamard order above 2 is a multiple of 4
    while n % k == 0 and k <= MAX_BASE_ORDER:
        if _known(k):
            return k, n // k
        k *= 2
    return (n // p, p) if n // p <= MAX_BASE_ORDER else None


def supported(n: int) -> bool:
    return factor(n) is not None


def _check(n: int) -> tuple[int, int]:
    f = factor(n)
    if f is None:
        raise ValueError(f"no Hadamard transform of order {n}: its odd part is above {MAX_BASE_ORDER}")
    return f


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """Dense H_n (float64, H_n H_n^T = n I; entries +-1 unless the base is the orthogonal fallback):
    the reference the fast transform is tested against."""
    k, p = _check(n)
    base = base_matrix(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(base, _sylvester(p))


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Randomized orthogonal Hadamard Q = H_n diag(s) / sqrt(n), s = random_signs(n, seed) (float64)."""
    return hadamard_matrix(n) * random_signs(n, seed) / math.sqrt(n)


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
        y = torch.einsum("ca,rcb->rab", base_matrix(k).to(y.device, y.dtype), y)
    return (y / math.sqrt(n)).reshape(*lead, n)


# Orders up to which a weight is rotated by one dense product (float64, n^2 work per row: little at
# these orders); above, by its Kronecker factors (kron_rotate: p q (p + q) per row). The two agree to
# float rounding, not bit for bit.
DENSE_UP_TO = 2048


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
    base = base_matrix(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64)
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
    on x viewed as [..., p, q]: p q (p + q) work per row, not n^2. Differentiable in A and B.
    With B 1 x 1, A is a dense matrix: one product."""
    if len(b) == 1:
        return (x @ a.T if inverse else x @ a) * b[0, 0]
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
