"""Load a causal LM from a path and capture it into the IR.

Accepted: a Hugging Face checkpoint directory (config.json + safetensors), a GGUF file
(dequantized by transformers' GGUF support), a llama2.c checkpoint (.bin, tokenizer beside it), or
a lowbit artifact directory. Nothing is unpickled: safetensors, GGUF and raw float32 only.
(Names such as the default model's are resolved to paths by lowbit.tools.defaults.)"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import LowbitError
from .graph import IR, ModelInfo, short_name
from .store import Stored

log = logging.getLogger("lowbit")


def package_version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


class HFTokenizer:
    """A transformers tokenizer behind lowbit's two-method interface (no special tokens added)."""

    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_token_id, tok.eos_token_id

    def __len__(self):
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, directory: Path):
        self.tok.save_pretrained(directory)


def load_tokenizer(directory: Path):
    """The tokenizer an artifact (or HF directory) carries."""
    from .llama2c import Llama2cTokenizer

    if (directory / "tokenizer.bin").exists():
        return Llama2cTokenizer(directory / "tokenizer.bin")
    from transformers import AutoTokenizer
    return HFTokenizer(AutoTokenizer.from_pretrained(directory))


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowbit"
    return Path(root)


def sha256_files(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_finite(model: torch.nn.Module, source):
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(f"{source}: tensor '{name}' contains NaN or Inf")


def _quiet_transformers():
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _model_info(cfg, name: str, source_hash: str | None, files) -> ModelInfo:
    # the config travels with the artifact: exports to other formats rebuild the architecture from it
    return ModelInfo(family=cfg.model_type, vocab_size=cfg.vocab_size,
                     max_ctx=int(getattr(cfg, "max_position_embeddings", 2048)),
                     source=name, source_hash=source_hash or sha256_files(files),
                     extra={"config": json.loads(cfg.to_json_string())})


def load_model(spec, tokenizer: str | None = None, name: str | None = None, source_hash: str | None = None):
    """-> (model, tokenizer, ModelInfo) for a checkpoint path; `name` and `source_hash`, when
    given, are what the ModelInfo records instead of the path and the files' hash."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(spec)
    name = name or str(path)
    if not path.exists():
        raise LowbitError(f"no such model: {spec} (a path to an HF directory, .gguf or llama2.c .bin)")
    try:
        if path.is_dir():
            if not (path / "config.json").exists():
                raise LowbitError(f"{path}: not a Hugging Face checkpoint (no config.json)")
            weights = sorted(path.glob("*.safetensors"))
            if not weights:
                raise LowbitError(f"{path}: no *.safetensors weights (pickled checkpoints are not loaded)")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True)
            tok = HFTokenizer(AutoTokenizer.from_pretrained(tokenizer or path))
            files = weights + [path / "config.json"]
        elif path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tok = HFTokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
            files = [path]
        elif path.suffix == ".bin":
            from .llama2c import Llama2cTokenizer, find_tokenizer, load_llama2c
            model, _ = load_llama2c(path)
            tok = Llama2cTokenizer(tokenizer or find_tokenizer(path))
            files = [path]
        else:
            raise LowbitError(f"{path}: unknown model format (expected an HF directory, .gguf or llama2.c .bin)")
    except LowbitError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"could not load {name}: {first}") from e
    _check_finite(model, name)
    return model.eval(), tok, _model_info(model.config, name, source_hash, files)


def checkpoint_keys(files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (file, shape)} of every tensor in safetensors files, read from their headers."""
    keys = {}
    for f in files:
        with safe_open(f, framework="pt") as h:
            for k in h.keys():
                keys[k] = (str(f), tuple(h.get_slice(k).get_shape()))
    return keys


def _converted(model, keys) -> dict[str, tuple[tuple[str, ...], object]]:
    """{parameter name: (checkpoint keys, build or None)} for tensors transformers renames while
    loading (one key, no build) or makes of several (an MoE's experts, stored one by one, stacked
    into one parameter), found and built by transformers' own conversion mapping and operations:
    `build(tensors)` runs them on the keys' tensors when the parameter is read."""
    import functools

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    out, groups = {}, {}
    for k in sorted(keys, key=dot_natural_key):   # experts in their order: 0, 1, ..., 10
        new, pattern = rename_source_key(k, renamings, converters, model.base_model_prefix, meta)
        if pattern is None:
            out.setdefault(new, ((k,), None))
        else:
            conv = next(c for c in converters if pattern in c.source_patterns)
            groups.setdefault(new, (conv, {}))[1].setdefault(pattern, []).append(k)
    for n, (conv, parts) in groups.items():
        order = [(p, parts[p]) for p in conv.source_patterns if p in parts]
        out[n] = (tuple(k for _, ks in order for k in ks), functools.partial(_convert, conv, [(p, len(ks)) for p, ks in order], n))
    return out


def _convert(conv, counts, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A converted parameter from its checkpoint tensors (in `_converted`'s order): transformers'
    operations of the converter, in turn."""
    collected, i = {}, 0
    for pattern, c in counts:
        collected[pattern], i = list(tensors[i:i + c]), i + c
    for op in conv.operations:
        collected = op.convert(collected, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                               full_layer_name=name)
    return next(iter(collected.values()))


def capture_lazy(path: Path, tokenizer: str | None, name: str, source_hash: str | None) -> IR | None:
    """Capture an HF checkpoint without reading its weights: the model is built with its parameters
    as fake tensors (its buffers, computed from the config, are real), exported, and every
    parameter becomes a `Stored` entry naming its tensor in the safetensors files, or the tensors
    transformers makes it of while loading (renamed ones; an MoE's experts stored one by one). None
    when a parameter has no tensor there of its name and shape: the checkpoint loads whole."""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .capture import TRANSPOSED, capture
    _quiet_transformers()
    files = sorted(path.glob("*.safetensors"))
    keys = checkpoint_keys(files)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    model.tie_weights()   # from_pretrained ties them; from_config leaves them apart
    prefix = getattr(model, "base_model_prefix", "") + "."
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}   # tied parameters: one tensor, several names
    for n, p in params.items():
        aliases.setdefault(id(p), []).append(n)
    key_of, built, converted = {}, {}, None
    for n in [*params, *(b for b, _ in model.named_buffers(remove_duplicate=False))]:
        names = aliases[id(params[n])] if n in params else [n]
        found = [k for a in names for k in (a, a.removeprefix(prefix)) if k in keys]
        if found:
            key_of[n] = found[0]
        elif n in params:
            converted = _converted(model, keys) if converted is None else converted
            parts, build = next((converted[a] for a in names if a in converted), ((), None))
            if not parts:
                log.info("%s: parameter %s is not in the checkpoint under its name: loading whole", name, n)
                return None
            key_of[n] = parts[0]
            if build is not None:
                built[n] = (parts, build)
    fm = FakeTensorMode(allow_non_fake_inputs=True)
    originals, fakes = list(model.parameters()), {}
    for mod in model.modules():
        for k, p in mod._parameters.items():
            if p is not None:
                if id(p) not in fakes:
                    with fm:
                        fakes[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
                mod._parameters[k] = fakes[id(p)]
    del originals
    info = _model_info(model.config, name, source_hash, files + [path / "config.json"])
    ir = capture(model, info, HFTokenizer(AutoTokenizer.from_pretrained(tokenizer or path)), fake_mode=fm)
    transposed = ir.gm.meta.get(TRANSPOSED, set())
    for target, t in [*ir.gm.named_parameters(remove_duplicate=False), *ir.gm.named_buffers(remove_duplicate=False)]:
        n = short_name(target)
        if n not in key_of:
            if is_fake(t):
                log.info("%s: %s is not in the checkpoint: loading whole", name, n)
                return None
            continue
        file, shape = keys[key_of[n]]
        turn = target in transposed
        if n in built:   # made of several checkpoint tensors: its shape is checked when it is read
            parts, build = built[n]
            ir.set_tensor(target, Stored(file, key_of[n], tuple(t.shape), t.dtype, turn,
                                         tuple((keys[k][0], k) for k in parts), build))
            continue
        if tuple(t.shape) != (shape[::-1] if turn else shape):
            log.info("%s: %s is %s in the checkpoint, %s in the model: loading whole", name, n, shape, tuple(t.shape))
            return None
        ir.set_tensor(target, Stored(file, key_of[n], tuple(t.shape), t.dtype, turn))
    return ir


_MAPPED = 1 << 20   # M_MMAP_THRESHOLD while a model is left on disk (0: glibc's own, dynamic)
_threshold = 0


def _mmap_threshold(size: int):
    global _threshold
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, size)   # M_MMAP_THRESHOLD
        _threshold = size
    except (OSError, AttributeError, TypeError):   # not glibc
        pass


def _unmap_freed_blocks():
    """glibc keeps freed blocks below its dynamic mmap threshold (which grows up to 32 MiB) in the
    heap, where fragmentation keeps them resident: with weights streaming through, resident
    memory then grows with the model (2.1 GB for a 1.1B RTN compile against 1.0 GB with this). Blocks
    of 1 MiB and more are mapped, and unmapped when freed, instead."""
    _mmap_threshold(_MAPPED)


@contextlib.contextmanager
def heap_temporaries():
    """Within it, blocks up to 32 MiB come from the heap even while a model is left on disk: a loop
    that allocates and frees the same few-MiB temporaries (learn-rotations' steps) would otherwise
    map fresh pages for each and fault them in (about 8x slower steps, measured on SmolLM2)."""
    before = _threshold
    if before:
        _mmap_threshold(32 << 20)
    try:
        yield
    finally:
        if before:
            _mmap_threshold(before)


def default_max_memory() -> int:
    """Half of this machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def load(spec, tokenizer: str | None = None, name: str | None = None, source_hash: str | None = None,
         max_memory: int | None = None) -> IR:
    """Load and capture. An artifact directory (lowbit compile output) loads as its compiled IR.
    A Hugging Face checkpoint is captured without its weights; they are read into memory when
    their float32 size is at most half of `max_memory` (default: half of physical memory), and
    otherwise stay in the checkpoint's files, read when a pass or a run needs them."""
    from .artifact import is_artifact, load_artifact
    log.info("loading %s", name or spec)
    t = time.perf_counter()
    path = Path(spec)
    ir = None
    if is_artifact(spec):
        ir = load_artifact(spec)
    elif path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors")):
        try:
            ir = capture_lazy(path, tokenizer, name or str(path), source_hash)
        except LowbitError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LowbitError(f"could not load {name or path}: {first}") from e
        if ir is not None:
            budget = max_memory or default_max_memory()
            if ir.nbytes() <= budget // 2:
                ir.materialize()
                _check_finite(ir.gm, name or path)
            else:
                log.info("%.1f GB of weights in float32: kept on disk, read as passes need them", ir.nbytes() / 1e9)
                _unmap_freed_blocks()
    if ir is None:
        from .capture import capture
        model, tok, info = load_model(spec, tokenizer, name, source_hash)
        ir = capture(model, info, tok)
    log.info("loaded and captured in %.1fs", time.perf_counter() - t)
    return ir
