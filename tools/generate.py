"""Token-by-token generation over a KV-cache decoder: one prefill call over the prompt, then one
call per new token. A backend offers `step(input_ids, attention_mask, position_ids, past)` on
numpy int64 arrays, returning (logits as numpy, presents), and `empty_past(batch)`."""
from __future__ import annotations

import time

import numpy as np
import torch

from lowbit.ir.decoder import to_decoder


class TorchDecoder:
    """The reference runtime over the IR's decoder form."""
    name = "torch"

    def __init__(self, ir, device: str = "cpu"):
        d = to_decoder(ir)
        self.device = torch.device(device)
        self.past_specs = d.past_specs
        self.gm, self.fused_sparse = on_device(d, self.device)

    def empty_past(self, b):
        return [torch.zeros(b, h, 0, x, dtype=t, device=self.device) for _, t, h, x in self.past_specs]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, past):
        out = self.gm(*(torch.from_numpy(a).to(self.device) for a in (input_ids, attention_mask, position_ids)), *past)
        return out[0].float().cpu().numpy(), list(out[1:])


def on_device(ir, device, lower: bool | None = None) -> tuple[torch.fx.GraphModule, int]:
    """(module, outlier adds fused) running the IR on `device`, weights folded. Lowered (by default
    on a CUDA device): quantized linears, tables, outliers and Hadamards become the kernel ops of
    lower-kernels{target=cuda}, which run the plugins' kernels on CUDA (outliers added in the GEMV
    epilogue) and the ops' PyTorch implementations elsewhere. Changes the IR's graph."""
    from lowbit.backends.reference import fold_weights
    device, fused = torch.device(device), 0
    if device.type == "cuda" if lower is None else lower:
        from lowbit.passes import PassManager
        PassManager("lower-kernels{target=cuda}").run(ir)
    if device.type == "cuda":
        from lowbit.plugins import torch_ops
        torch_ops.register()
        fused = torch_ops.fuse_sparse(ir.graph)
    if device.type != "cpu":   # tensor factories (the decoder's mask arange, ...) default to the CPU
        from lowbit.ir.store import makes_tensor
        for n in ir.graph.nodes:
            if makes_tensor(n):
                n.kwargs = {**n.kwargs, "device": device}
        ir.changed()
    with torch.no_grad():
        return fold_weights(ir).to(device), fused


def _pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    if temperature <= 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, -1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def generate(backend, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             seed: int = 0, eos: int | None = None, on_token=None) -> dict:
    """Greedy (temperature 0) or sampled continuation of one prompt; returns the new ids and the
    prefill and per-token decode times."""
    rng = np.random.default_rng(seed)
    ids = np.array([prompt_ids], dtype=np.int64)
    n = ids.shape[1]
    t0 = time.perf_counter()
    logits, past = backend.step(ids, np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None], backend.empty_past(1))
    t_prefill = time.perf_counter() - t0
    new, t1 = [], time.perf_counter()
    for i in range(max_new_tokens):
        tok = int(_pick(logits[:, -1], temperature, top_k, rng)[0])
        new.append(tok)
        if on_token:
            on_token(tok)
        if tok == eos or i == max_new_tokens - 1:
            break
        pos = n + len(new) - 1
        logits, past = backend.step(np.array([[tok]], np.int64), np.ones((1, pos + 1), np.int64),
                                    np.array([[pos]], np.int64), past)
    steps = max(len(new) - 1, 1)
    return {"ids": new, "prefill_s": t_prefill, "prefill_tokens": n, "decode_s": time.perf_counter() - t1,
            "decode_tokens": steps}
