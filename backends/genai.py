"""onnxruntime-genai model folders: lowbit's KV-cache decoder ONNX (flavor ort: MatMulNBits) with
the tokenizer files and the `genai_config.json` that `onnxruntime_genai.Model(folder)` reads.

The decoder's inputs and outputs are already the layout onnxruntime-genai runs (`input_ids,
attention_mask, position_ids, past_key_values.{i}.key/value -> logits, present.{i}.key/value`,
float cache [batch, kv_heads, seq, head_dim]); the config names them and gives the model's sizes.
The model type is "decoder", onnxruntime-genai's type for any decoder-only model with this layout
(it reads nothing family-specific from it). A quantized KV cache (quantize-kv) has no form there
and is refused; a llama2.c tokenizer has no tokenizer.json, so the folder then holds none and
generation takes token ids."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from lowbit.ir.artifact import atomic_dir
from lowbit.ir.errors import LowbitError

from .onnx import export_onnx

log = logging.getLogger("lowbit")


def genai_config(ir) -> dict:
    """The genai_config.json of the decoder exported from `ir` (its KV-cache form: past_specs);
    special tokens from the artifact's tokenizer."""
    s = ir.analysis
    a = s.attentions[0]
    bos, eos = getattr(ir.tokenizer, "bos_id", None), getattr(ir.tokenizer, "eos_id", None)
    pad = getattr(getattr(ir.tokenizer, "tok", None), "pad_token_id", None)   # a transformers tokenizer's
    return {
        "model": {
            "bos_token_id": bos if bos is not None else 0,
            "context_length": ir.info.max_ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": a.head_dim,
                "hidden_size": ir.placeholder(s.embedding_weight).shape[1],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": a.n_heads,
                "num_hidden_layers": len(s.attentions),
                "num_key_value_heads": a.n_kv_heads,
            },
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
            "type": "decoder",
            "vocab_size": ir.info.vocab_size,
        },
        "search": {"do_sample": False, "max_length": ir.info.max_ctx, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def export_genai(ir, out: Path, tokenizer_dir: Path | None = None, accuracy_level: int = 4) -> Path:
    """An onnxruntime-genai folder at `out`: model.onnx (+ its data), the tokenizer's files
    (tokenizer.json and its config, when the artifact has them) and genai_config.json."""
    from lowbit.ir.decoder import to_decoder
    out = Path(out)
    if any(dtype is not torch.float32 for _, dtype, *_ in to_decoder(ir).past_specs):
        raise LowbitError("onnxruntime-genai keeps a float KV cache; this artifact quantizes it (quantize-kv)")
    with atomic_dir(out) as tmp:
        export_onnx(ir, tmp / "model.onnx", "ort", "decoder", accuracy_level)
        if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").exists():
            for f in tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        else:
            log.warning("%s: no tokenizer.json to copy (onnxruntime-genai then generates from token ids)", out)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(ir), indent=2) + "\n")
    return out / "model.onnx"
