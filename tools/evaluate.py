"""Perplexity over non-overlapping windows: the first `max_tokens` tokens of a text tokenized
whole (no special tokens), cut into windows of `ctx`; ppl = exp(mean NLL of every token after
the first in each window)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.ir.errors import LowbitError


def read_text(path) -> str:
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"no such text file: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise LowbitError(f"{path}: the text is empty")
    return text


def windows(tokens: list[int], ctx: int, max_tokens: int | None) -> torch.Tensor:
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    count = n // ctx
    if count == 0:
        raise LowbitError(f"the text has {len(tokens)} tokens, fewer than one window of ctx={ctx}")
    return torch.tensor(tokens[:count * ctx], dtype=torch.long).view(count, ctx)


def check_ctx(ctx: int, max_ctx: int):
    if ctx < 2:
        raise LowbitError(f"ctx must be at least 2, got {ctx}")
    if ctx > max_ctx:
        raise LowbitError(f"ctx {ctx} is larger than the model allows ({max_ctx} positions)")


@torch.no_grad()
def perplexity(logits_fn, win: torch.Tensor, batch: int = 4, progress: bool = True) -> dict:
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(win), batch), desc="perplexity", unit="batch", disable=not progress, leave=False):
        ids = win[i:i + batch]
        logits = logits_fn(ids)[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                               reduction="sum").double().item()
        count += ids[:, 1:].numel()
    if not math.isfinite(nll):
        raise LowbitError("the model produced non-finite logits")
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": win.numel(), "predicted": count,
            "windows": len(win), "ctx": win.shape[1]}
