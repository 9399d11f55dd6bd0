"""CUDA kernels (plugins/): they compile here (nvcc is on the CPU machines), and on a GPU each one
matches its op's PyTorch implementation (marker gpu: skipped with a reason without CUDA)."""
import ctypes
import math

import pytest
import torch

from lowbit.ir import hadamard, kernels
from lowbit.ir.quant import pack, to_csr
from lowbit.plugins.build import ENTRY_POINTS, build, nvcc


@pytest.mark.skipif(nvcc() is None, reason="nvcc is not installed")
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    lib = build(tmp_path)
    handle = ctypes.CDLL(str(lib))   # loads without a GPU: the CUDA runtime is linked statically
    assert all(hasattr(handle, name) for name in ENTRY_POINTS)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_ops():
    from lowbit.plugins import torch_ops
    torch_ops.register()
    return torch_ops


def _w4(n, k, group, sym, g):
    codes = torch.randint(0, 16, (n, k), generator=g)
    ng = math.ceil(k / group)
    scales = torch.rand(n, ng, generator=g).half() * 0.05 + 0.01
    zeros = None if sym else pack(torch.randint(0, 16, (n, ng), generator=g), 4)
    return kernels.to_matmul_nbits(pack(codes, 4), scales, zeros, 4, group, k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 3, 8, 17])
@pytest.mark.parametrize("n,k,group,sym", [(256, 512, 128, False), (96, 576, 64, True), (130, 1000, 32, False)])
def test_w4_matmul_matches_reference(cuda_ops, m, n, k, group, sym):
    g = torch.Generator().manual_seed(m * n)
    b, s, z, bs = _w4(n, k, group, sym, g)
    x = torch.randn(m, k, generator=g)
    ref = kernels.matmul_nbits(x, b, s, z, None, k, n, 4, bs)
    got = cuda_ops.matmul_nbits(x.cuda(), b.cuda(), s.cuda(), None if z is None else z.cuda(), None, k, n, 4, bs).cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()   # fp16 activations and output


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m,n,k", [(1, 64, 256), (5, 33, 100)])
def test_lut_matmul_matches_reference(cuda_ops, bits, m, n, k):
    g = torch.Generator().manual_seed(bits)
    q = pack(torch.randint(0, 1 << bits, (n, k), generator=g), bits)
    lut = torch.randn(n, 1 << bits, generator=g).half()
    x = torch.randn(m, k, generator=g)
    ref = kernels.lut_matmul(x, q, lut, bits, k)
    got = cuda_ops.lut_matmul(x.cuda(), q.cuda(), lut.cuda(), bits, k).cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.gpu
@gpu
def test_sparse_matmul_matches_reference(cuda_ops):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 300, generator=g)
    crow, col, val = to_csr(torch.rand(70, 300, generator=g) < 0.0045 * 10, w)
    x = torch.randn(4, 300, generator=g)
    ref = kernels.sparse_matmul(x, crow, col, val, 70)
    got = cuda_ops.sparse_matmul(x.cuda(), crow.cuda(), col.cuda(), val.cuda(), 70).cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n", [64, 4096, 172 * 4, 12 * 128])
def test_hadamard_matches_reference(cuda_ops, n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    ref = hadamard.fwht(x)
    got = cuda_ops.hadamard(x.cuda()).cpu()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
