"""Perplexity as lowbit computes it, for the peer scripts that run in their own environments
(llmcompressor_peer.py, gptqmodel_peer.py import it from beside them; it imports only torch)."""
import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 4) -> float:
    """exp(mean NLL of every token after the first in each window) of a transformers causal LM."""
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
