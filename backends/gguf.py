"""GGUF files llama.cpp runs, written with the gguf package: llama.cpp's llama architecture
(Llama, Mistral, SmolLM2), its hyperparameters, the tokenizer, and every tensor.

Quantized linears keep lowbit's own codes and scales, on a grid that is exactly a GGUF type, so
what GPTQ chose (with rotations fused into the weights) is written as it is, never rounded again:
- Q4_0: 4-bit symmetric groups of 32 (`quantize-weights{bits=4,group=32,sym=true}`): a block is
  the fp16 scale d then 16 bytes, byte j holding codes j (low nibble) and j + 16; w = d (q - 8),
  lowbit's symmetric zero point 8.
- Q4_1: 4-bit groups of 32 with an fp16 minimum (`sym=false,offset=min`): d, the minimum m, then
  the codes as in Q4_0; w = d q + m.
- Q5_0, Q5_1: 5-bit, as Q4_0 and Q4_1 (zero point 16), the codes' fifth bits in 4 bytes (qh, bit j
  of code j) before the low nibbles.
- Q8_0: 8-bit symmetric groups of 32: d then 32 int8 values q - 128.
Every block is dequantized again with the gguf package's reference and compared with lowbit's
weight before the file is kept. The 2-D tensors lowbit left in float (embedding, an unquantized
output projection) are Q8_0 as in llama.cpp's own 4-bit files, or float32 on request; the rest
(norms; those fold-norms folded written as the pure normalizations they are) float32. llama.cpp applies RoPE to interleaved pairs, so
q's and k's rows are permuted per head as llama.cpp's own converter does (rows only: codes and
scales move with them). Refused by name: online transforms and activation/KV quantizers
(llama.cpp has none), other grids, input widths not a multiple of 32, other architectures.
A tokenizer.json byte-level BPE vocabulary is written as llama.cpp's "gpt2" model; without one
(llama2.c) the file has no vocabulary and runs from token ids."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from lowbit.ir import meta
from lowbit.ir.errors import LowbitError
from lowbit.ir.formats.base import unpack

from .source import refuse_inexpressible, source_weights

log = logging.getLogger("lowbit")
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}   # config.model_type -> llama.cpp architecture


def _rope_rows(n_rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q (or k): within each head, the two halves that
    rotate_half pairs are interleaved."""
    return torch.arange(n_rows).reshape(heads, 2, n_rows // heads // 2).transpose(1, 2).reshape(-1)


def _blocks(lin, ir) -> np.ndarray:
    """A quantized linear's codes and scales (and minima) as GGUF blocks [N, K / 32 * bytes per block]."""
    q = lin.node.meta[meta.QUANT]
    qw, sc, mins = (ir.tensor(a.target) if a is not None else None for a in lin.weight_node.args[:3])
    bits = q["bits"]
    codes = unpack(qw, bits, lin.in_features).numpy()
    n, k = codes.shape

    def halves(t):   # one fp16 per block, as its 2 bytes
        return t.numpy().astype(np.float16).reshape(n, k // 32, 1).view(np.uint8)
    c = codes.reshape(n, k // 32, 32)
    parts = [halves(sc)] + ([halves(mins)] if mins is not None else [])
    if bits == 8:
        parts.append((c.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if bits == 5:   # bit 4 of code j is bit j of the little-endian 32-bit qh
            parts.append(np.packbits((c >> 4).astype(np.uint8), axis=-1, bitorder="little"))
        parts.append(((c[..., :16] & 15) | ((c[..., 16:] & 15) << 4)).astype(np.uint8))
    return np.concatenate(parts, -1).reshape(n, -1)


def _qtype(lin, gguf):
    q = lin.node.meta[meta.QUANT]
    T = gguf.GGMLQuantizationType
    types = {(4, True, "zero"): T.Q4_0, (4, False, "min"): T.Q4_1, (5, True, "zero"): T.Q5_0,
             (5, False, "min"): T.Q5_1, (8, True, "zero"): T.Q8_0}
    qtype = types.get((q["bits"], q["sym"], q.get("offset", "zero"))) if q["group"] == 32 else None
    if qtype is None or lin.in_features % 32:
        grid = "symmetric" if q["sym"] else "asymmetric with " + ("an fp16 minimum" if q.get("offset") == "min"
                                                                  else "integer zero points")
        raise LowbitError(f"gguf: node '{lin.node.name}' ({lin.name}) is {q['bits']}-bit, group {q['group']}, {grid}, "
                          f"K = {lin.in_features}; lowbit writes groups of 32 on a K that 32 divides: Q4_0, Q5_0, "
                          "Q8_0 (sym=true) and Q4_1, Q5_1 (sym=false,offset=min)")
    return qtype


FLOAT_TYPES = ("q8_0", "q4_0", "f32")


def export_gguf(ir, out: Path, tokenizer_dir: Path | None = None, float_type: str = "q8_0") -> Path:
    """float_type: what the 2-D tensors lowbit left in float become (the embedding table, an
    unquantized output projection): q8_0, as llama.cpp's own 4-bit files store them, or q4_0 (smaller;
    both rounded by the gguf package's reference, as llama.cpp's quantizer would), or f32 (exactly
    lowbit's)."""
    import gguf
    if float_type not in FLOAT_TYPES:
        raise LowbitError(f"gguf: float type must be one of {', '.join(FLOAT_TYPES)}, not '{float_type}'")
    refuse_inexpressible(ir, "gguf")
    config, state, quantized = source_weights(ir, "gguf")
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise LowbitError(f"gguf: lowbit writes llama.cpp's llama architecture ({', '.join(ARCHITECTURES)}), "
                          f"not {config.model_type} yet")
    qtypes = {name: _qtype(lin, gguf) for name, lin in quantized.items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")   # moved into place whole
    w = gguf.GGUFWriter(str(partial), arch)
    w.add_name(ir.info.source)
    w.add_string("general.quantized_by", "lowbit")   # `lowbit eval`/`run` run such files in llama.cpp
    w.add_context_length(ir.info.max_ctx)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(config.vocab_size)
    common = max(set(qtypes.values()), key=list(qtypes.values()).count) if qtypes else None   # the linears' usual type
    w.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{common.name}") if common else gguf.LlamaFileType.ALL_F32)
    _vocab(w, tokenizer_dir, config, gguf)

    def rows(hf: str, n: int):   # llama.cpp's q/k row order
        if hf.endswith(("q_proj", "q_proj.weight")):
            return _rope_rows(n, heads)
        if hf.endswith(("k_proj", "k_proj.weight")):
            return _rope_rows(n, kv_heads)
        return None

    def gguf_name(hf: str) -> str:
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"gguf: no llama.cpp tensor for '{hf}'")
        return name
    table_type = getattr(gguf.GGMLQuantizationType, float_type.upper(), None)
    for hf, t in state.items():
        t = t.float()
        order = rows(hf, t.shape[0]) if t.dim() == 2 else None
        t = (t if order is None else t[order]).contiguous().numpy()
        if float_type != "f32" and t.ndim == 2 and t.shape[1] % 32 == 0:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, table_type), raw_dtype=table_type)
        else:
            w.add_tensor(gguf_name(hf), t)
    for hf, lin in quantized.items():
        blocks = _blocks(lin, ir)
        w_hat = ir.constant(lin.weight_node)
        order = rows(hf, blocks.shape[0])
        if order is not None:
            blocks, w_hat = blocks[order.numpy()], w_hat[order]
        back = gguf.quants.dequantize(blocks, qtypes[hf])
        if not np.array_equal(back, w_hat.numpy()):
            raise LowbitError(f"gguf: '{hf}' does not read back as lowbit's weight (max error "
                              f"{np.abs(back - w_hat.numpy()).max():.2e})")
        w.add_tensor(gguf_name(f"{hf}.weight"), blocks, raw_dtype=qtypes[hf])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def _vocab(w, tokenizer_dir, config, gguf):
    """tokenizer.json's byte-level BPE vocabulary as llama.cpp's "gpt2" tokenizer, with merges and
    special tokens; none without one (llama.cpp then takes token ids)."""
    try:
        vocab = gguf.vocab.BpeVocab(tokenizer_dir)
    except (FileNotFoundError, TypeError, KeyError, ValueError, AttributeError, OSError):
        w.add_tokenizer_model("none")
        log.warning("gguf: no byte-level BPE tokenizer.json: the file has no vocabulary (llama.cpp runs it from "
                    "token ids)")
        return
    tokens, _, types = zip(*vocab.all_tokens())
    tokens, types = list(tokens), list(types)
    pad = config.vocab_size - len(tokens)   # embedding rows past the tokenizer's: unused
    tokens += [f"[PAD{i}]".encode() for i in range(pad)]
    types += [gguf.TokenType.UNUSED] * pad
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.vocab.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(w)


def linear_bits_per_weight(path) -> float:
    """Bits per weight of a GGUF file's linear layers as stored (blocks with their scales and
    minima): every 2-D tensor but the embedding table and the output projection."""
    import gguf
    ts = [t for t in gguf.GGUFReader(path).tensors
          if len(t.shape) == 2 and t.name not in ("token_embd.weight", "output.weight")]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)
