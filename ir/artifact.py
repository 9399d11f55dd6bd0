"""Compiled artifacts: a directory holding everything needed to run the compiled model.

    manifest.json       versions, seed, source and calibration hashes, pipeline, per-pass stats
    graph.json          the IR graph: nodes with op, target, arguments and lowbit metadata
    weights.safetensors every tensor the graph reads (packed integer weights, scales, ...), in
                        shards of at most 2 GiB: weights-00001.safetensors, ... after the first
    extras.safetensors  tensors kept for repeating a compile (learned rotations), if any
    tokenizer/          the source model's tokenizer

Loading runs no code from the artifact. Nothing is pickled; graph.json is data, checked before
any node runs:
- op targets are resolved from an allow-list only: the aten ops captures of causal LMs produce
  (ATEN_OPS), lowbit's own ops (LOWBIT_OPS) and a few `operator` functions; never by import;
- node names, placeholders, keyword names and tensor paths must be plain identifiers (torch.fx
  writes them into the Python source of the graph module, so anything else could inject code);
- arguments decode to plain values, earlier nodes, and real dtypes, devices, layouts;
- the graph must then run on a two-token input and return logits [1, 2, vocab].
Anything else is refused with one line naming what was found.

A directory is written under a temporary name (`.NAME.partial-PID-*`) and renamed into place
only once complete; the next save into the same place removes partial directories left by
processes that no longer run (a compile killed with kill -9)."""
from __future__ import annotations

import contextlib
import json
import keyword
import math
import operator
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import experts, formats, hadamard, meta, quant  # noqa: F401  (they register the lowbit ops graphs call)
from .errors import LowbitError
from .graph import IR, ModelInfo
from .store import Stored, unshared

FORMAT = "lowbit-artifact/1"

# aten ops a torch.export capture of a causal LM produces before decomposition (collected from
# captures of 23 dense transformers families: Llama, Mistral, Qwen2/3, Gemma 1-3, Phi, Phi-3, GPT-2,
# OPT, GPT-NeoX, StableLM, OLMo, OLMo2, Granite, Cohere, Starcoder2, Bloom, GLM, ...), those lowbit's
# passes, decoder rewrite and lowering add, and a few elementwise and layout ops of the same kind.
# tests/test_artifact.py checks every test family's capture against it. Ops that take raw memory
# or strides (as_strided, set_) or allocate uninitialized memory are not here; in-place arithmetic
# (add_, div_, ...) is, as it writes only into tensors the graph already holds, like its functional form.
ATEN_OPS = frozenset("""
    __and__ __or__ _to_copy _unsafe_view abs add add_ addmm alias all any arange argmax baddbmm bitwise_not
    bmm broadcast_to cat ceil chunk clamp clone contiguous cos cumsum detach diff div div_ dropout embedding
    eq erf exp expand lift_fresh_copy mul_ sub_ topk sort histc index_put
    flatten floor floor_divide full full_like ge gelu gt index index_select layer_norm le linear log
    logical_and logical_not logical_or lt masked_fill matmul max maximum mean min minimum mm mul ne neg
    new_ones new_zeros ones ones_like permute pow reciprocal relu repeat repeat_interleave reshape rsqrt
    scaled_dot_product_attention select sigmoid silu sin slice softmax softplus split split_with_sizes
    sqrt squeeze stack sub sum sym_size t tanh to transpose tril triu type_as unbind unflatten unsqueeze
    view where zeros zeros_like
""".split())

LOWBIT_OPS = frozenset("""
    dequantize dequantize_lut sparse_add matmul_nbits dequantize_blocked gather_lut scatter_add
    lut_matmul sparse_matmul hadamard rotate_kron quantize_tokens kv_quantize kv_dequantize grouped_linear
""".split())

_OPERATORS = {f"operator.{f.__name__}": f for f in (operator.getitem, operator.add, operator.sub, operator.mul,
                                                      operator.floordiv, operator.truediv, operator.neg)}

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TENSOR_PATH = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*\Z")


class CorruptArtifact(LowbitError):
    pass


# -- graph <-> JSON -------------------------------------------------------------------------------
def _target_name(t) -> str:
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return f"torch.ops.{t.namespace}.{t._schema.name.split('::')[1]}.{t._overloadname}"
    if getattr(t, "__module__", None) in ("_operator", "operator"):
        return f"operator.{t.__name__}"
    return f"{t.__module__}.{t.__qualname__}"


def _resolve_target(name: str):
    """An op from the allow-list, looked up by name; never an import or an arbitrary attribute."""
    if name in _OPERATORS:
        return _OPERATORS[name]
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 5 and parts[:2] == ["torch", "ops"] and _IDENT.match(parts[4]):
        ns, op, overload = parts[2:]
        if (ns, op) in [("aten", o) for o in ATEN_OPS] + [("lowbit", o) for o in LOWBIT_OPS]:
            packet = getattr(getattr(torch.ops, ns), op)
            if overload in packet.overloads():
                return getattr(packet, overload)
    raise CorruptArtifact(f"artifact graph calls {name}, which is not an op lowbit loads")


def _ident(s, what: str) -> str:
    if not (isinstance(s, str) and _IDENT.match(s) and not keyword.iskeyword(s)):
        raise CorruptArtifact(f"corrupt artifact graph: {what} {s!r} is not a plain identifier")
    return s


def _tensor_path(s, what: str = "tensor name") -> str:
    if not (isinstance(s, str) and _TENSOR_PATH.match(s)) or any(p.startswith("__") for p in s.split(".")):
        raise CorruptArtifact(f"corrupt artifact: {what} {s!r} is not a dotted path of plain names")
    return s


def _enc(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, (list, tuple)):
        return {"tuple" if isinstance(a, tuple) else "list": [_enc(x) for x in a]}
    for kind, typ in _TORCH_VALUES.items():
        if isinstance(a, typ):
            return {kind: str(a).removeprefix("torch.")}
    raise LowbitError(f"cannot serialize graph argument {a!r} of type {type(a).__name__}")


_TORCH_VALUES = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format,
                 "device": torch.device}


def _dec(a, env):
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if not (isinstance(a, dict) and len(a) == 1):
        raise CorruptArtifact(f"corrupt artifact graph: argument {str(a)[:60]!r} is not a value lowbit writes")
    (kind, v), = a.items()
    if kind == "node":
        if v not in env:
            raise CorruptArtifact(f"corrupt artifact graph: argument refers to node {str(v)[:60]!r} before it is defined")
        return env[v]
    if kind in ("list", "tuple") and isinstance(v, list):
        seq = [_dec(x, env) for x in v]
        return seq if kind == "list" else tuple(seq)
    if kind == "float" and v in ("inf", "-inf", "nan"):
        return float(v)
    if kind == "device" and isinstance(v, str) and re.fullmatch(r"(cpu|cuda|meta)(:\d+)?", v):
        return torch.device(v)
    if kind in ("dtype", "layout", "memory_format") and isinstance(v, str) and _IDENT.match(v):
        value = getattr(torch, v, None)
        if isinstance(value, _TORCH_VALUES[kind]):
            return value
    raise CorruptArtifact(f"corrupt artifact graph: argument {kind}={str(v)[:60]!r} is not a value lowbit writes")


def graph_to_json(g: fx.Graph) -> list[dict]:
    return [{"name": n.name, "op": n.op, "target": _target_name(n.target),
             "args": _enc(list(n.args)), "kwargs": {k: _enc(v) for k, v in n.kwargs.items()},
             "meta": {k: n.meta[k] for k in meta.SERIALIZED if k in n.meta}}
            for n in g.nodes]


_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "meta"}


def graph_from_json(nodes) -> fx.Graph:
    """The graph of graph.json, every name, target and argument checked (see the module doc)."""
    if not isinstance(nodes, list) or not nodes:
        raise CorruptArtifact("corrupt artifact graph: not a list of nodes")
    g, env = fx.Graph(), {}
    for i, d in enumerate(nodes):
        if not isinstance(d, dict) or set(d) != _NODE_KEYS or not isinstance(d["args"], dict) \
                or not isinstance(d["kwargs"], dict) or not isinstance(d["meta"], dict):
            raise CorruptArtifact(f"corrupt artifact graph: node {i} is not a node lowbit writes")
        name = _ident(d["name"], "node name")
        if name in env:
            raise CorruptArtifact(f"corrupt artifact graph: two nodes named {name!r}")
        if "output" in env:
            raise CorruptArtifact("corrupt artifact graph: nodes after the output")
        args = _dec(d["args"], env)
        if not isinstance(args, list):
            raise CorruptArtifact(f"corrupt artifact graph: arguments of {name!r} are not a list")
        kwargs = {_ident(k, "keyword"): _dec(v, env) for k, v in d["kwargs"].items()}
        op, target = d["op"], d["target"]
        if op == "placeholder":
            n = g.create_node(op, _ident(target, "input"), name=name)
        elif op == "get_attr":
            n = g.create_node(op, _tensor_path(target), name=name)
        elif op == "call_function":
            n = g.create_node(op, _resolve_target(target), tuple(args), kwargs, name=name)
        elif op == "output" and len(args) == 1 and not kwargs:
            n = g.output(args[0])
            name = "output"
        else:
            raise CorruptArtifact(f"corrupt artifact graph: node {name!r} has op {str(op)[:40]!r}")
        if n.name != name:   # torch.fx renamed it: it would shadow a name the generated code uses
            raise CorruptArtifact(f"corrupt artifact graph: node name {name!r} is reserved")
        for k in meta.SERIALIZED:
            if k in d["meta"]:
                n.meta[k] = d["meta"][k]
        if not isinstance(n.meta.get(meta.HANDLE, 0), int):
            raise CorruptArtifact(f"corrupt artifact graph: node {name!r} has a debug handle that is not a number")
        env[name] = n
    if "output" not in env or not any(n.op == "placeholder" for n in g.nodes):
        raise CorruptArtifact("corrupt artifact graph: no input or no output")
    g.lint()
    return g


# -- directories ----------------------------------------------------------------------------------
def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def scratch_dir(prefix: str, directory=None) -> Path:
    """A fresh directory `prefix<pid>-...` in `directory` (default: the temporary directory), made
    after removing those of the same prefix whose process is gone (killed with kill -9)."""
    directory = Path(directory or tempfile.gettempdir())
    for p in directory.glob(prefix + "*"):
        pid = p.name[len(prefix):].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:   # alive, another user's
            pass
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=directory))


@contextlib.contextmanager
def atomic_dir(target: Path):
    """A fresh directory beside `target` that replaces it when the block completes and is removed
    when the block fails or is interrupted: readers never see a half-written directory."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise LowbitError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(_partial_prefix(target), target.parent)
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:   # mkdtemp makes 0700; this is ordinary data
            p.chmod(0o755 if p.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_artifact(path) -> bool:
    return (Path(path) / "manifest.json").is_file() and (Path(path) / "graph.json").is_file()


def check_output_dir(out: Path, force: bool):
    """Refuse an output that is a file, or a non-empty directory without --force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LowbitError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise LowbitError(f"{out} exists and is not empty (use --force to replace it)")


def save_artifact(ir: IR, out: Path, manifest: dict, force: bool = False):
    out = Path(out)
    check_output_dir(out, force)
    with atomic_dir(out) as tmp:
        save_tensors(ir, tmp)
        if ir.extra_tensors:
            save_file({k: v.contiguous() for k, v in ir.extra_tensors.items()}, tmp / "extras.safetensors")
        (tmp / "graph.json").write_text(json.dumps(graph_to_json(ir.graph)))
        if ir.tokenizer is not None:
            (tmp / "tokenizer").mkdir()
            ir.tokenizer.save(tmp / "tokenizer")
        full = {"format": FORMAT, **manifest, "model": vars(ir.info), "pipeline": ",".join(ir.passes_run),
                "pipeline_entries": ir.passes_run, "passes": ir.stats}
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=str))


SHARD_BYTES = 2 << 30


def save_tensors(ir: IR, directory: Path, shard_bytes: int = SHARD_BYTES):
    """Every tensor the graph reads into weights*.safetensors, a shard at a time: tensors on disk
    are read as they come, so memory holds one shard (of at most the spill budget, if any)."""
    if ir.spill is not None:
        shard_bytes = min(shard_bytes, ir.spill.budget)
    shard, size, i = {}, 0, 0
    for name, t in ir.referenced_tensors():
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            save_file(unshared(shard), directory / _shard_name(i))
            shard, size, i = {}, 0, i + 1
    if shard or i == 0:
        save_file(unshared(shard), directory / _shard_name(i))


def point_at(ir: IR, path: Path):
    """Make the IR's tensors on disk read from the artifact at `path` (which holds them all), so
    that the IR outlives the spill and resume files it was compiled with."""
    for f in weight_files(path):
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                if k in ir.stored:
                    ir.set_tensor(k, Stored(str(f), k, ir.stored[k].shape, ir.stored[k].dtype))


def _shard_name(i: int) -> str:
    return "weights.safetensors" if i == 0 else f"weights-{i:05d}.safetensors"


def weight_files(path: Path) -> list[Path]:
    """An artifact's weight shards, in order."""
    return sorted(Path(path).glob("weights*.safetensors"))


def read_manifest(path) -> dict:
    try:
        man = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptArtifact(f"{path}: unreadable artifact manifest ({e})") from None
    if not isinstance(man, dict):
        raise CorruptArtifact(f"{path}: the artifact manifest is not a JSON object")
    return man


def _model_info(path, man) -> ModelInfo:
    m = man.get("model")
    types = {"family": str, "vocab_size": int, "max_ctx": int, "source": str, "source_hash": str, "extra": dict}
    if not (isinstance(m, dict) and set(types) - {"extra"} <= set(m) <= set(types)
            and all(isinstance(m[k], t) and not isinstance(m[k], bool) for k, t in types.items() if k in m)
            and m["vocab_size"] > 0 and m["max_ctx"] > 1):
        raise CorruptArtifact(f"{path}: the artifact manifest does not describe a model")
    entries = man.get("pipeline_entries", [])
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)
            and isinstance(man.get("passes", []), list)):
        raise CorruptArtifact(f"{path}: the artifact manifest's pipeline is not a list of passes")
    return ModelInfo(**m)


def load_artifact(path) -> IR:
    from .load import load_tokenizer
    path = Path(path)
    man = read_manifest(path)
    if man.get("format") != FORMAT:
        raise CorruptArtifact(f"{path}: artifact format {man.get('format')!r}, this lowbit reads {FORMAT}")
    info = _model_info(path, man)
    try:
        nodes = json.loads((path / "graph.json").read_text())
        tensors = {}
        for f in weight_files(path) or [path / "weights.safetensors"]:
            tensors.update(load_file(f))
    except Exception as e:
        raise CorruptArtifact(f"{path}: corrupt artifact ({type(e).__name__}: {e})") from None
    g = graph_from_json(nodes)
    ir = IR(fx.GraphModule(torch.nn.Module(), fx.Graph()), info)
    for name, t in tensors.items():
        try:
            ir.set_tensor(_tensor_path(name), t)
        except (KeyError, AttributeError, TypeError) as e:   # a name that collides with a module attribute
            raise CorruptArtifact(f"{path}: corrupt artifact, tensor name {name!r} cannot be stored ({e})") from None
    missing = [n.target for n in g.nodes if n.op == "get_attr" and n.target not in tensors]
    if missing:
        raise CorruptArtifact(f"{path}: corrupt artifact, tensors missing from weights: {missing[:3]}")
    ir.gm = fx.GraphModule(ir.gm, g)
    ir._next_handle = 1 + max(n.meta.get(meta.HANDLE, 0) for n in g.nodes)
    ir.passes_run = list(man.get("pipeline_entries", []))
    ir.stats = man.get("passes", [])
    _smoke_run(path, ir)
    if (path / "extras.safetensors").exists():
        ir.extra_tensors = load_file(path / "extras.safetensors")
    tok_dir = path / "tokenizer"
    ir.tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
    return ir


def _smoke_run(path, ir: IR):
    """The graph runs on two tokens and returns logits [1, 2, vocab]: a graph that loads runs."""
    try:
        out = ir(torch.zeros(1, 2, dtype=torch.long))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CorruptArtifact(f"{path}: corrupt artifact, its graph fails on a test input ({type(e).__name__}: {first})") \
            from None
    if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 2, ir.info.vocab_size)):
        raise CorruptArtifact(f"{path}: corrupt artifact, its graph does not return logits [batch, seq, "
                              f"{ir.info.vocab_size}]")
