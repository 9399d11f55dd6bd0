"""CUDA implementations of the `lowbit` kernel ops, registered with torch.library so a lowered
graph runs on a GPU (`lowbit run --backend torch --device cuda`): the library from build.py,
called through ctypes on the tensors' device pointers and the current stream. Activations are
computed in fp16 (the kernels' type) and returned in the caller's dtype.

    matmul_nbits (4 bits)  -> lowbit_w4_matmul (GEMV up to batch 8, tensor-core GEMM above)
    lut_matmul (3/4 bits)  -> lowbit_lut_matmul
    sparse_matmul          -> lowbit_csr_add
    hadamard               -> lowbit_hadamard
Other cases (2 or 8 bits) fall back to the ops' PyTorch implementations, which also run on CUDA."""
from __future__ import annotations

import ctypes
import functools

import torch

from lowbit.ir import hadamard as had
from lowbit.ir import kernels  # noqa: F401  (defines the ops registered below)

from .build import ENTRY_POINTS, build


@functools.cache
def library(path: str | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path or build()))
    for name in ENTRY_POINTS:
        getattr(lib, name).restype = ctypes.c_int
    return lib


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def _check(rc: int, what: str):
    if rc:
        raise RuntimeError(f"lowbit CUDA kernel {what} failed (error {rc})")


def _rows(x, k):
    return x.reshape(-1, k).to(torch.float16).contiguous()


def matmul_nbits(x, b, scales, zero_points, bias, K, N, bits, block_size):
    if bits != 4:
        return _reference("matmul_nbits", x, b, scales, zero_points, bias, K, N, bits, block_size)
    a = _rows(x, K)
    y = torch.empty(a.shape[0], N, dtype=torch.float16, device=x.device)
    _check(library().lowbit_w4_matmul(_p(a), _p(b.contiguous()), _p(scales.to(torch.float16).contiguous()),
                                      _p(zero_points), _p(y), a.shape[0], N, K, block_size, _stream()), "w4_matmul")
    y = y.to(x.dtype).reshape(*x.shape[:-1], N)
    return y + bias if bias is not None else y


def lut_matmul(x, qweight, lut, bits, K):
    if bits not in (3, 4):
        return _reference("lut_matmul", x, qweight, lut, bits, K)
    a = _rows(x, K)
    n = qweight.shape[0]
    y = torch.empty(a.shape[0], n, dtype=torch.float16, device=x.device)
    lut16 = lut.to(torch.float16).contiguous()
    for i in range(0, a.shape[0], 8):   # the GEMV takes up to 8 rows at a time
        m = min(8, a.shape[0] - i)
        _check(library().lowbit_lut_matmul(_p(a[i:]), _p(qweight.contiguous()), _p(lut16), _p(y[i:]), m, n, K, bits,
                                           _stream()), "lut_matmul")
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def sparse_matmul(x, crow, col, val, N):
    k = x.shape[-1]
    a = _rows(x, k)
    y = torch.zeros(a.shape[0], N, dtype=torch.float16, device=x.device)
    _check(library().lowbit_csr_add(_p(a), _p(crow.int().contiguous()), _p(col.int().contiguous()),
                                    _p(val.to(torch.float16).contiguous()), _p(y), a.shape[0], N, k, _stream()), "csr_add")
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


@functools.cache
def _base(k: int, device: str):
    return had._base_matrices()[k].float().contiguous().to(device)


def hadamard(x):
    n = x.shape[-1]
    k, _ = had._check(n)
    a = _rows(x, n)
    y = torch.empty_like(a)
    base = _base(k, str(x.device)) if k > 1 else None
    _check(library().lowbit_hadamard(_p(a), _p(y), a.shape[0], n, k, _p(base), _stream()), "hadamard")
    return y.to(x.dtype).reshape(x.shape)


_REFERENCE = {}


def _reference(name, *args):
    return _REFERENCE[name](*args)


def register():
    """Register the CUDA implementations (idempotent)."""
    if _REFERENCE:
        return
    for name, fn in (("matmul_nbits", matmul_nbits), ("lut_matmul", lut_matmul), ("sparse_matmul", sparse_matmul),
                     ("hadamard", hadamard)):
        op = getattr(kernels, name, None) or getattr(had, name)
        _REFERENCE[name] = op._init_fn   # the op's PyTorch implementation
        op.register_kernel("cuda")(fn)
