"""Tensors kept on disk until something reads them, so that a model larger than memory compiles.

A checkpoint too large to hold is captured without its weights (ir/load.py): each tensor of the IR
is then a `Stored` entry, a placeholder on the meta device in the module and the name of its
safetensors file. `IR.tensor` reads it whole, in the dtype the whole-model path would hold, every
time it is asked (nothing is cached), and the caller frees it. What passes write stays in memory
up to a budget; past it the `Spill` moves the written tensors into safetensors files (one each) in its own
directory and they become `Stored` entries too; a pass that rewrites a stored tensor as a function of
it alone (`IR.rewrite`) leaves it there, to be rewritten when read (`Rewritten`). `OnDemand` runs the graph node by node, reading a
stored tensor only when a node uses it, so a forward pass holds the live activations and the
weights of one node."""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import LowbitError

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                      "I64": torch.int64, "BOOL": torch.bool}


def _read(file: str, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, contiguous, those sharing storage with an earlier one copied: safetensors
    refuses shared storage (tied weights, views), and copying only those keeps memory flat."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


@dataclass(frozen=True)
class Stored:
    """A tensor in a safetensors file: `read()` returns it as `dtype` (a 16-bit checkpoint widens to
    float32 exactly), transposed where capture stored the weight transposed (GPT-2's Conv1D); or
    made by `build` of several (`parts`: (file, key) each; an MoE's experts stacked)."""
    file: str
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    transpose: bool = False
    parts: tuple = ()
    build: Callable | None = None

    def read(self) -> torch.Tensor:
        if self.build is not None:
            t = self.build([_read(f, k) for f, k in self.parts])
            if tuple(t.shape) != self.shape:
                raise LowbitError(f"{self.key}: the checkpoint's tensors make {tuple(t.shape)}, the model expects "
                                  f"{self.shape}")
        else:
            t = _read(self.file, self.key)
        t = t.t() if self.transpose else t
        return t.to(self.dtype).contiguous()

    def placeholder(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class Rewritten(Stored):
    """A tensor on disk as a pass rewrote it: `fn` of the tensor `base` reads, applied at each read
    (the rewrite's inputs besides it, such as a norm's scale or a rotation, are in fn). Weights that
    passes rewrite one after another (fold a norm, rotate, rotate down's input) are thus read from
    the checkpoint once, by the pass that packs them, and are never written out in float32."""
    base: Stored | None = None
    fn: Callable | None = None

    def read(self) -> torch.Tensor:
        t = self.fn(self.base.read())
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise LowbitError(f"{self.key}: a rewrite made {t.dtype} {tuple(t.shape)} of {self.dtype} {self.shape}")
        return t


class Spill:
    """Where the tensors passes write go once more than `budget` bytes of them are in memory: a
    safetensors file per tensor in `directory`, deleted when the tensor is replaced or dropped (so
    the disk holds the live tensors only; a file of many would stay while any of them lives)."""

    def __init__(self, directory: Path, budget: int):
        self.dir, self.budget = Path(directory), budget
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, int] = {}   # target -> bytes, written since the last flush
        self.files: set[str] = set()         # the spill files of live IR tensors
        self._names = (f"spill-{os.getpid()}-{i:06d}.safetensors" for i in itertools.count())

    def wrote(self, ir, target: str, t: torch.Tensor):
        self.pending[target] = t.numel() * t.element_size()
        if sum(self.pending.values()) > self.budget:
            self.flush(ir)

    def forget(self, target: str, old: Stored | None):
        self.pending.pop(target, None)
        if old is not None and old.file in self.files:
            self.files.discard(old.file)
            Path(old.file).unlink(missing_ok=True)

    def flush(self, ir):
        for target in list(self.pending):
            t, file = ir.tensor(target), str(self.dir / next(self._names))
            save_file({target: t.contiguous()}, file)
            ir.set_tensor(target, Stored(file, target, tuple(t.shape), t.dtype))
            self.files.add(file)


class _Deferred:
    """What a get_attr node yields under OnDemand: the tensor is read when a node uses it."""
    __slots__ = ("target",)

    def __init__(self, target: str):
        self.target = target


_FACTORIES = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step,
              torch.ops.aten.full.default, torch.ops.aten.ones.default, torch.ops.aten.zeros.default,
              torch.ops.aten.scalar_tensor.default, torch.ops.aten.empty.memory_format}


def makes_tensor(n: fx.Node) -> bool:
    """Whether a node makes a tensor on a device of its own (a factory, or any op given a device):
    captured on the CPU, it is made on the CPU unless its device is set."""
    return n.op == "call_function" and ("device" in n.kwargs or n.target in _FACTORIES)


class OnDemand(fx.Interpreter):
    """Runs an IR's graph node by node, reading each stored tensor when a node uses it and dropping
    it after that node: memory holds the live activations and one node's weights. On another
    `device` (a GPU), each tensor is moved there as it is read, and the tensors the graph makes
    (captured on the CPU: masks, positions) are made there."""

    def __init__(self, ir, device: torch.device | str | None = None):
        super().__init__(ir.gm)
        self.ir = ir
        self.device = None if device is None or torch.device(device).type == "cpu" else torch.device(device)

    def run_node(self, n: fx.Node):
        if n.op == "get_attr":
            return _Deferred(n.target)
        return super().run_node(n)

    def read(self, target: str) -> torch.Tensor:
        """The tensor a node uses, when it runs (a subclass may hand it another)."""
        t = self.ir.tensor(target)
        return t if self.device is None else t.to(self.device)

    def fetch_args_kwargs_from_env(self, n: fx.Node):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        read = lambda a: self.read(a.target) if isinstance(a, _Deferred) else a   # noqa: E731
        args, kwargs = fx.node.map_aggregate(args, read), fx.node.map_aggregate(kwargs, read)
        if self.device is not None and makes_tensor(n):
            kwargs = {**kwargs, "device": self.device}
        return args, kwargs


class Segments:
    """An IR's graph cut at the residual stream's values (the analysis' `stream`), to run one block at a
    time: segment k ends at stream[k] and computes it from stream[k-1] and from values made before it
    (positions, masks, RoPE tables); the last one is the head. `later[v]`: the segments after v's own
    that read v (the values a segment hands on)."""

    def __init__(self, ir):
        from bisect import bisect_left
        self.ir, self.stream = ir, ir.analysis.stream
        order = {n: i for i, n in enumerate(ir.graph.nodes)}
        bounds = [order[v] for v in self.stream]
        self.segments: list[list[fx.Node]] = [[] for _ in range(len(bounds) + 1)]
        self.seg: dict[fx.Node, int] = {}
        for n in ir.graph.nodes:
            if n.op != "get_attr":   # tensors are read when a node uses them
                self.seg[n] = bisect_left(bounds, order[n])
                self.segments[self.seg[n]].append(n)
        self.later: dict[fx.Node, set[int]] = {}
        for n, k in self.seg.items():
            for a in n.all_input_nodes:
                if a in self.seg and self.seg[a] < k:
                    self.later.setdefault(a, set()).add(k)
        self.start = next(n for n in ir.graph.nodes if n.op == "placeholder")

    def run(self, k: int, env: dict, value: Callable | None = None):
        """Run segment k's nodes over env (values of earlier nodes); a tensor a node uses is read
        from the IR, or is `value(get_attr node)` when given."""
        value = value or (lambda a: env[a] if a.op != "get_attr" else self.ir.tensor(a.target))
        for n in self.segments[k]:
            if n.op == "placeholder":
                continue
            args, kwargs = fx.node.map_arg(n.args, value), fx.node.map_arg(n.kwargs, value)
            env[n] = args[0] if n.op == "output" else n.target(*args, **kwargs)

    def handed_on(self, k: int, env: dict) -> dict:
        """The values of env that a segment after k still reads."""
        return {v: x for v, x in env.items() if max(self.later.get(v, ()), default=-1) > k}


class Checkpoint:
    """Finished pieces of a long pass, kept on disk so that a compile killed at any moment (kill -9
    included) resumes where it stopped: a record is a safetensors file of tensors with a JSON note
    in its metadata, written under a temporary name and renamed, so it is whole or absent. Of
    several processes compiling together, one writes (`write`); all read."""

    def __init__(self, directory: Path, write: bool = True):
        self.dir, self.write = Path(directory), write
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _file(self, key: str) -> Path:
        return self.dir / (re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".safetensors")

    def has(self, key: str) -> bool:
        return self._file(key).exists()

    def get(self, key: str) -> tuple[dict[str, Stored], dict] | None:
        """(tensors left on disk, note) of a finished piece, or None."""
        f = self._file(key)
        if not f.exists():
            return None
        with safe_open(f, framework="pt") as h:
            note = json.loads(h.metadata()["note"])
            tensors = {k: Stored(str(f), k, tuple(h.get_slice(k).get_shape()), SAFETENSORS_DTYPES[h.get_slice(k).get_dtype()])
                       for k in h.keys()}
        return tensors, note

    def put(self, key: str, tensors: dict[str, torch.Tensor], note: dict) -> dict[str, Stored] | None:
        """Record a finished piece; returns its tensors as `Stored` entries of the record."""
        if not self.write:
            return None
        f = self._file(key)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        save_file(unshared(tensors), str(tmp), metadata={"note": json.dumps(note)})
        os.replace(tmp, f)
        return {k: Stored(str(f), k, tuple(t.shape), t.dtype) for k, t in tensors.items()}

