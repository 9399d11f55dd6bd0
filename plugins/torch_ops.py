"""CUDA implementations of the `lowbit` kernel ops, registered with torch.library so a lowered
graph runs on a GPU (`lowbit run --backend torch --device cuda`): the library from build.py,
called through ctypes on the tensors' device pointers and the current stream. Activations are
computed in fp16 (the kernels' type) and returned in the caller's dtype.

    matmul_nbits (4 bits)  -> lowbit_w4_matmul (GEMV, batch <= 32, 4 rows per launch), or lowbit_w4_dequant and a
                              cuBLAS tensor-core GEMM above
    lut_matmul (3/4 bits)  -> lowbit_lut_matmul (GEMV, 8 rows of x per launch)
    sparse_matmul          -> lowbit_csr_add; added to a GEMV's output (`fuse_sparse`), the GEMV
                              adds the outliers in its epilogue instead
    hadamard               -> lowbit_hadamard
Other cases (2 or 8 bits, blocks under 32, unaligned tensors) fall back to the ops' PyTorch
implementations, which also run on CUDA."""
from __future__ import annotations

import ctypes
import functools

import torch

from lowbit.ir import hadamard as had
from lowbit.ir.formats import lut, sparse, uniform

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


def _csr(sparse):
    if sparse is None:
        return None, None, None
    crow, col, val = sparse
    return crow.int().contiguous(), col.int().contiguous(), val.to(torch.float16).contiguous()


def matmul_nbits(x, b, scales, zero_points, bias, K, N, bits, block_size, sparse=None):
    """x @ W^T (+ bias); `sparse` = (crow, col, val) outliers, added by the GEMV's epilogue."""
    a = _rows(x, K)
    s = scales.to(torch.float16).contiguous()
    rc, csr, fused = -1, _csr(sparse), False
    if bits == 4 and a.shape[0] <= 32:
        y = torch.empty(a.shape[0], N, dtype=torch.float16, device=x.device)
        rc = library().lowbit_w4_matmul(_p(a), _p(b.contiguous()), _p(s), _p(zero_points), *map(_p, csr), _p(y),
                                        a.shape[0], N, K, block_size, _stream())
        fused = True
    elif bits == 4:           # prefill-sized batches: dequantize once, then cuBLAS on tensor cores
        w = torch.empty(N, K, dtype=torch.float16, device=x.device)
        rc = library().lowbit_w4_dequant(_p(b.contiguous()), _p(s), _p(zero_points), _p(w), N, K, block_size,
                                         _stream())
        if rc == 0:
            y = a @ w.T
    if rc == -1:
        y, fused = _REFERENCE["matmul_nbits"](a, b, scales, zero_points, None, K, N, bits, block_size).half(), False
    _check(max(rc, 0), "w4_matmul")
    if sparse is not None and not fused:
        y = y + sparse_matmul(a, *csr, N)
    y = y.to(x.dtype).reshape(*x.shape[:-1], N)
    return y + bias if bias is not None else y


def lut_matmul(x, qweight, lut, bits, K, sparse=None):
    a = _rows(x, K)
    n = qweight.shape[0]
    csr = _csr(sparse)
    if bits in (3, 4):
        y = torch.empty(a.shape[0], n, dtype=torch.float16, device=x.device)
        q, lut16 = qweight.contiguous(), lut.to(torch.float16).contiguous()
        for i in range(0, a.shape[0], 8):   # the GEMV takes up to 8 rows at a time
            _check(library().lowbit_lut_matmul(_p(a[i:]), _p(q), _p(lut16), *map(_p, csr), _p(y[i:]),
                                               min(8, a.shape[0] - i), n, K, bits, _stream()), "lut_matmul")
    else:
        y = _REFERENCE["lut_matmul"](a, qweight, lut, bits, K).half()
        if sparse is not None:
            y = y + sparse_matmul(a, *csr, n)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def sparse_matmul(x, crow, col, val, N):
    k = x.shape[-1]
    a = _rows(x, k)
    crow, col, val = _csr((crow, col, val))
    y = torch.zeros(a.shape[0], N, dtype=torch.float16, device=x.device)
    _check(library().lowbit_csr_add(_p(a), _p(crow), _p(col), _p(val), _p(y), a.shape[0], N, k, _stream()), "csr_add")
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


@functools.cache
def _base(k: int, device: str):
    """H_k transposed and zero-padded to a multiple of 16, in half: the tensor cores' operand."""
    kpad = -(-k // 16) * 16
    ht = torch.zeros(kpad, kpad, dtype=torch.float16)
    ht[:k, :k] = had.base_matrix(k).T.half()
    return ht.to(device)


def hadamard(x):
    n = x.shape[-1]
    k, _ = had._check(n)
    a = _rows(x, n)
    y = torch.empty_like(a)
    base = _base(k, str(x.device)) if k > 1 else None
    rc = library().lowbit_hadamard(_p(a), _p(y), a.shape[0], n, k, base.shape[0] if k > 1 else 1, _p(base), _stream())
    if rc == -1:
        return _REFERENCE["hadamard"](x)
    _check(rc, "hadamard")
    return y.to(x.dtype).reshape(x.shape)


def _w4_sparse(x, b, scales, zero_points, bias, K, N, bits, block_size, crow, col, val):
    return matmul_nbits(x, b, scales, zero_points, bias, K, N, bits, block_size, (crow, col, val))


def _lut_sparse(x, qweight, lut, bits, K, crow, col, val):
    return lut_matmul(x, qweight, lut, bits, K, (crow, col, val))


def fuse_sparse(graph) -> int:
    """add(matmul_nbits or lut_matmul of x, sparse_matmul of x) -> one GEMV that adds the outliers
    in its epilogue. Returns how many were fused."""
    fused = {"lowbit.matmul_nbits.default": _w4_sparse, "lowbit.lut_matmul.default": _lut_sparse}
    count = 0
    for n in list(graph.nodes):
        if n.target is not torch.ops.aten.add.Tensor or len(n.args) != 2 or n.kwargs:
            continue
        dense, sp = n.args if _name(n.args[1]) == "lowbit.sparse_matmul.default" else n.args[::-1]
        if (_name(sp) != "lowbit.sparse_matmul.default" or _name(dense) not in fused
                or dense.args[0] is not sp.args[0] or len(dense.users) != 1 or len(sp.users) != 1):
            continue
        with graph.inserting_before(n):
            new = graph.call_function(fused[_name(dense)], (*dense.args, *sp.args[1:4]))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        for old in (n, dense, sp):
            graph.erase_node(old)
        count += 1
    return count


def _name(node) -> str:
    return str(getattr(node, "target", ""))


_REFERENCE = {}


def _reference(name, *args):
    return _REFERENCE[name](*args)


def register():
    """Register the CUDA implementations (idempotent)."""
    if _REFERENCE:
        return
    for op, fn in ((uniform.matmul_nbits, matmul_nbits), (lut.lut_matmul, lut_matmul),
                   (sparse.sparse_matmul, sparse_matmul), (had.hadamard, hadamard)):
        name = op._name.split("::")[-1]
        _REFERENCE[name] = op._init_fn   # the op's PyTorch implementation
        op.register_kernel("cuda")(fn)
