"""Exported files as inputs to `lowbit eval` and `lowbit run`, each run by the runtime it was made
for, so that what is measured is the file that is deployed:
- an ONNX file lowbit exported (any flavor, decoder or full form): onnxruntime;
- an onnxruntime-genai folder: onnxruntime-genai generates; its model.onnx gives eval's logits
  through onnxruntime (onnxruntime-genai returns the last position's only);
- a compressed-tensors checkpoint directory: transformers (through the compressed-tensors package);
- a GGUF file lowbit wrote: llama.cpp (llama-cpp-python), with the file's own tokenizer.
Any other path is a model or an artifact, loaded as before."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lowbit.ir.errors import LowbitError


@dataclass
class Deployed:
    kind: str
    logits: Callable[[torch.Tensor], torch.Tensor]   # ids [B, S] -> logits [B, S, vocab]
    greedy: Callable[[list[int], int, int | None], list[int]]   # (prompt ids, new tokens, eos) -> new ids
    tokenizer: object
    max_ctx: int


class _LlamaCppTokenizer:
    """llama.cpp's own tokenization of a GGUF's vocabulary (what a llama.cpp user gets)."""

    def __init__(self, llm):
        self.llm, self.bos_id, self.eos_id = llm, llm.token_bos(), llm.token_eos()

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode(errors="replace")


def _tokenizer(directory: Path | None, what: str):
    from lowbit.ir.load import load_tokenizer
    if directory is None or not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.bin")):
        raise LowbitError(f"{what} carries no tokenizer: pass --tokenizer DIR (the artifact's tokenizer/ folder)")
    return load_tokenizer(directory)


def _ort_greedy(backend):
    from lowbit.tools.generate import generate

    def greedy(ids, n, eos):
        if not backend.past_specs and len(backend.inputs) == 1:
            raise LowbitError("a full-sequence ONNX export has no KV cache to generate with (export --form decoder)")
        return generate(backend, ids, n, eos=eos)["ids"]
    return greedy


def _onnx(path: Path, tokenizer: Path | None) -> Deployed:
    from lowbit.backends.onnx import OrtBackend
    ort = OrtBackend(path)
    return Deployed("onnx", ort.logits, _ort_greedy(ort), _tokenizer(tokenizer or path.parent, str(path)), 1 << 30)


def _genai(folder: Path, tokenizer: Path | None) -> Deployed:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise LowbitError("an onnxruntime-genai folder needs onnxruntime-genai (pip install 'lowbit[genai]')") from e
    from lowbit.backends.onnx import OrtBackend
    cfg = json.loads((folder / "genai_config.json").read_text())["model"]
    model = og.Model(str(folder))

    def greedy(ids, n, eos):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out
    ort = OrtBackend(folder / cfg["decoder"]["filename"])
    return Deployed("onnx-genai", ort.logits, greedy, _tokenizer(tokenizer or folder, str(folder)), cfg["context_length"])


def _compressed(folder: Path, tokenizer: Path | None) -> Deployed:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def logits(ids):
        return model(ids).logits

    @torch.no_grad()
    def greedy(ids, n, eos):
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos if eos is not None else 0)
        return out[0, len(ids):].tolist()
    ctx = int(getattr(model.config, "max_position_embeddings", 2048))
    return Deployed("compressed-tensors", logits, greedy, _tokenizer(tokenizer or folder, str(folder)), ctx)


def open_gguf(path: Path, tokenizer: Path | None = None, fields=None) -> Deployed:
    """A GGUF file in llama.cpp (llama-cpp-python): lowbit's, or any llama-architecture file."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LowbitError("a GGUF file runs in llama.cpp here: pip install 'lowbit[llamacpp]'") from e
    if fields is None:
        import gguf
        fields = gguf.GGUFReader(path).fields
    ctx = int(fields["llama.context_length"].contents())
    llm = llama_cpp.Llama(str(path), n_ctx=ctx, logits_all=True, verbose=False, n_batch=min(ctx, 512))

    def logits(ids):
        rows = []
        for row in ids.tolist():
            llm.reset()
            llm.eval(row)
            rows.append(np.array(llm.scores[: len(row)], dtype=np.float32))
        return torch.from_numpy(np.stack(rows))

    def greedy(ids, n, eos):
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(t)
            if t == eos:
                break
            llm.eval([t])
        return out
    has_vocab = llm.n_vocab() > 0 and llm.metadata.get("tokenizer.ggml.model") not in (None, "none", "no_vocab")
    tok = _LlamaCppTokenizer(llm) if has_vocab else _tokenizer(tokenizer, str(path))
    return Deployed("gguf", logits, greedy, tok, ctx)


def open_deployed(path, tokenizer=None) -> Deployed | None:
    """The runner of an exported file or folder; None for anything else (a model or an artifact)."""
    p = Path(str(path))
    tok = Path(tokenizer) if tokenizer else None
    if p.is_file() and p.suffix == ".onnx":
        return _onnx(p, tok)
    if p.is_dir() and (p / "genai_config.json").exists():
        return _genai(p, tok)
    if p.is_dir() and (p / "config.json").exists():
        q = json.loads((p / "config.json").read_text()).get("quantization_config") or {}
        if q.get("quant_method") == "compressed-tensors":
            return _compressed(p, tok)
    if p.is_file() and p.suffix == ".gguf":
        import gguf
        fields = gguf.GGUFReader(p).fields
        by = fields.get("general.quantized_by")
        if by is not None and by.contents() == "lowbit":
            return open_gguf(p, tok, fields)
    return None
