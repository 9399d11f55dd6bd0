"""The PyTorch reference runtime: runs any IR (captured, or after any pass) on CPU, lowbit's
custom ops through their reference implementations."""
from __future__ import annotations

import torch


class ReferenceBackend:
    name = "torch"

    def __init__(self, ir):
        self.ir = ir

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq] int64 -> [batch, seq, vocab] float32."""
        return self.ir.gm(input_ids)
