"""Load a causal LM from a path and capture it into the IR.

Accepted: a Hugging Face checkpoint directory (config.json + safetensors), a GGUF file
(dequantized by transformers' GGUF support), a llama2.c checkpoint (.bin, tokenizer beside it), or
a lowbit artifact directory. Nothing is unpickled: safetensors, GGUF and raw float32 only.
(Names such as the default model's are resolved to paths by lowbit.tools.defaults.)"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from importlib import metadata
from pathlib import Path

import torch

from .errors import LowbitError
from .graph import IR, ModelInfo

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
    cfg = model.config
    info = ModelInfo(family=cfg.model_type, vocab_size=cfg.vocab_size,
                     max_ctx=int(getattr(cfg, "max_position_embeddings", 2048)),
                     source=name, source_hash=source_hash or sha256_files(files))
    return model.eval(), tok, info


def load(spec, tokenizer: str | None = None, name: str | None = None, source_hash: str | None = None) -> IR:
    """Load and capture. An artifact directory (lowbit compile output) loads as its compiled IR."""
    from .artifact import is_artifact, load_artifact
    log.info("loading %s", name or spec)
    t = time.perf_counter()
    if is_artifact(spec):
        ir = load_artifact(spec)
    else:
        from .capture import capture
        model, tok, info = load_model(spec, tokenizer, name, source_hash)
        ir = capture(model, info, tok)
    log.info("loaded and captured in %.1fs", time.perf_counter() - t)
    return ir
