"""llama2.c checkpoints (legacy format) and their tokenizer, read without unpickling.

Checkpoint: 7 x int32 header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
max_seq_len; a negative vocab_size means an unshared classifier follows), then float32 weights
in llama2.c order. Q/K rows use llama2.c's interleaved rotary layout and are permuted into the
Hugging Face (rotate-half) layout here.
Tokenizer: int32 max_token_length, then per token: float32 score, int32 length, bytes."""
from __future__ import annotations

import heapq
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import LowbitError

_V1_MAGIC = 0x616B3432


class Llama2cTokenizer:
    """Encodes like llama2.c's run.c: a dummy-prefix space, one token per UTF-8 character (byte
    fallback id = byte + 3), then greedy merges of the best-scoring adjacent pair, leftmost first
    on ties. The merges use a heap, so long texts encode in O(n log n)."""
    bos_id, eos_id = 1, 2

    def __init__(self, path: str | Path):
        self.path = Path(path)
        data = self.path.read_bytes()
        try:
            off, self.pieces, self.scores = 4, [], []
            while off < len(data):
                score, length = struct.unpack_from("<fi", data, off)
                off += 8
                if length < 0 or off + length > len(data):
                    raise ValueError
                self.pieces.append(data[off:off + length])
                self.scores.append(score)
                off += length
        except (struct.error, ValueError):
            raise LowbitError(f"corrupt llama2.c tokenizer: {path}") from None
        self.lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)

    def __len__(self):
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = [self.lookup[b" "]]
        for ch in text:
            b = ch.encode("utf-8")
            ids.extend([self.lookup[b]] if b in self.lookup else [x + 3 for x in b])
        n = len(ids)
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j < n:
                m = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[j]])
                if m is not None:
                    heapq.heappush(heap, (-self.scores[m], i, ids[i], ids[j], m))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b, m = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or ids[i] != a or ids[j] != b:
                continue  # stale: one side was merged since this pair was pushed
            ids[i], alive[j] = m, False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [t for t, ok in zip(ids, alive) if ok]

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        for k, t in enumerate(ids):
            piece = self.pieces[t]
            if k == 0 and piece.startswith(b" "):
                piece = piece[1:]
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                piece = bytes([int(piece[3:5], 16)])
            out += piece
        return out.decode("utf-8", errors="replace")

    def save(self, directory: Path):
        (directory / "tokenizer.bin").write_bytes(self.path.read_bytes())


def find_tokenizer(checkpoint: Path) -> Path:
    here = checkpoint.parent
    if (here / "tokenizer.bin").exists():
        return here / "tokenizer.bin"
    found = sorted(here.glob("tok*.bin"))
    if len(found) == 1:
        return found[0]
    raise LowbitError(f"no tokenizer beside {checkpoint}: expected tokenizer.bin or one tok*.bin "
                      "(or pass --tokenizer)")


def _permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def load_llama2c(path: Path):
    """-> (LlamaForCausalLM in fp32, config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    raw = path.read_bytes()
    if len(raw) < 28:
        raise LowbitError(f"corrupt llama2.c checkpoint {path}: {len(raw)} bytes, shorter than its header")
    dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack_from("<7i", raw)
    if dim == _V1_MAGIC:
        raise LowbitError(f"{path}: llama2.c version-1 export format is not supported (legacy format only)")
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, layers, heads, kv_heads, vocab, seq) <= 0 or dim % heads or heads % kv_heads:
        raise LowbitError(f"corrupt llama2.c checkpoint {path}: implausible header "
                          f"dim={dim} hidden={hidden} layers={layers} heads={heads}/{kv_heads}")
    hd = dim // heads
    kv = kv_heads * hd
    shapes = [("embed", (vocab, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
              ("wk", (layers, kv, dim)), ("wv", (layers, kv, dim)), ("wo", (layers, dim, dim)),
              ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
              ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("freq", (seq, hd))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    want = 28 + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != want:
        raise LowbitError(f"corrupt llama2.c checkpoint {path}: {len(raw)} bytes, header implies {want}")
    flat = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=28).copy())
    w, off = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        w[name] = flat[off:off + size].view(shape)
        off += size

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=shared,
                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    sd = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["rms_final"],
          "lm_head.weight": w["embed"] if shared else w["wcls"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "self_attn.q_proj.weight"] = _permute(w["wq"][i], heads)
        sd[p + "self_attn.k_proj.weight"] = _permute(w["wk"][i], kv_heads)
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    if missing or unexpected:
        raise LowbitError(f"llama2.c weights do not map onto Llama: missing {missing}, unexpected {unexpected}")
    if shared:
        model.tie_weights()
    return model, cfg
