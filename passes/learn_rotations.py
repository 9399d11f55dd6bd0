from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.ir.hadamard import hadamard_matrix, random_hadamard, random_orthogonal, supported
from lowbit.ir.quant import QuantSpec, fake_quantize

from .base import Exact, Pass, PassContext, PassFailure, PassResult, register
from .fuse_rotations import LEARNED_R1, check_head_path, check_rotatable, learned_r2, rotated_tensors


def _start(n: int, seed: int) -> torch.Tensor:
    return random_hadamard(n, seed) if supported(n) else random_orthogonal(n, seed)


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (as SpinQuant's SGDG): the Riemannian gradient
    A R with A = G R^T - R G^T skew-symmetric, step size min(lr, 1/||A||_1), and the Cayley
    retraction (I + a/2 A)^-1 (I - a/2 A) R, which keeps R exactly orthogonal."""
    a = grad @ r.T - r @ grad.T
    alpha = min(lr, 1.0 / (torch.linalg.matrix_norm(a, ord=1).item() + 1e-8))
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + alpha / 2 * a, (eye - alpha / 2 * a) @ r)


@register
class LearnRotations(Pass):
    """Learn R1 and R2 (SpinQuant): Cayley SGD from random Hadamard, minimizing the LM loss under the later weight, activation and KV quantizers."""
    name = "learn-rotations"

    @dataclass(frozen=True)
    class Config:
        steps: int = 50
        lr: float = 0.05    # cap on the Cayley step (SpinQuant: 1.5; 0.05 measured best on stories260K)
        calib: int = 128    # calibration sequences (cycled through)
        seq: int = 256      # tokens per sequence
        batch: int = 2      # sequences per step
        seed: int = 0
        load: str = ""      # an artifact directory whose learned rotations to reuse instead of learning

    def contract(self):
        return Exact(0.0)   # records matrices beside the graph; the function is untouched

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        if LEARNED_R1 in ir.extra_tensors:
            return PassResult(False, {"already": True})
        s = ir.analysis
        fuse = [e for e in ctx.later if e.pass_cls.name == "fuse-rotations" and e.config.kind == "learned"]
        if not fuse:
            raise PassFailure("no fuse-rotations{kind=learned} follows: the learned rotations would be unused")
        if c.load:
            return self._load(ir, s, Path(c.load))
        quant = [e for e in ctx.later if e.pass_cls.name == "quantize-weights"]
        if not quant:
            raise PassFailure("no quantize-weights follows: there is no quantization error to learn against")
        if ctx.calib is None:
            raise PassFailure("needs calibration text (compile --calib FILE)")
        check_rotatable(s)
        r2_on = fuse[0].config.r2
        if r2_on:
            for a in s.attentions:
                check_head_path(a)
        qc = quant[0].config
        spec = QuantSpec(qc.bits, qc.group, qc.sym)
        r4 = any(e.pass_cls.name == "insert-hadamard" and e.config.r4 for e in ctx.later)
        seqs = ctx.calib[:, : ctx.calib.shape[1] // c.seq * c.seq].reshape(-1, c.seq)[: c.calib]
        if len(seqs) == 0:
            raise PassFailure(f"calibration windows are shorter than seq={c.seq}")

        d = ir.tensor(s.embedding_weight).shape[1]
        r1 = _start(d, c.seed).float().requires_grad_()
        r2s = [_start(a.head_dim, c.seed + 1 + i).float().requires_grad_() for i, a in enumerate(s.attentions)] \
            if r2_on else []
        base = {}

        def get(t):
            if t not in base:
                base[t] = ir.tensor(t).float()
            return base[t]

        quantized = [lin for lin in s.linears.values() if qc.lm_head or lin is not s.lm_head]
        downs = {m.down.weight for m in s.mlps} if r4 else set()
        h4 = {n: (hadamard_matrix(n) / math.sqrt(n)).float() for n in {m.down.in_features for m in s.mlps}} if r4 else {}
        gm, online, simulated = self._simulation(ir, ctx)

        def loss_on(ids):
            new = rotated_tensors(s, get, r1, r2s)
            params = dict(new)
            for lin in quantized:
                w = new.get(lin.weight, get(lin.weight))
                if lin.weight in downs:   # R4 is fused into down before quantization
                    h = h4[w.shape[1]]
                    wq = fake_quantize(w @ h, spec)    # RTN: the proxy for any method
                    params[lin.weight] = wq if online else wq @ h.T
                else:
                    params[lin.weight] = fake_quantize(w, spec)
            logits = torch.func.functional_call(gm, params, (ids,))
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

        probe = seqs[: c.batch]   # a fixed batch, for a before/after loss that compares like with like
        with torch.no_grad():
            before = loss_on(probe).item()
        t0 = time.perf_counter()
        for step in tqdm(range(c.steps), desc="learn-rotations", disable=not ctx.progress, leave=False):
            loss = loss_on(seqs[torch.arange(step * c.batch, (step + 1) * c.batch) % len(seqs)])
            grads = torch.autograd.grad(loss, [r1, *r2s])
            with torch.no_grad():
                for r, g in zip([r1, *r2s], grads):
                    r.copy_(cayley_step(r.double(), g.double(), c.lr).float())
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            after = loss_on(probe).item()
        ir.extra_tensors[LEARNED_R1] = r1.detach().double()
        for i, r in enumerate(r2s):
            ir.extra_tensors[learned_r2(i)] = r.detach().double()
        return PassResult(True, {"steps": c.steps, "tokens": c.steps * c.batch * c.seq, "seconds": round(seconds, 1),
                                 "probe_loss_before": round(before, 4), "probe_loss_after": round(after, 4),
                                 "learned_under": [quant[0].text(), *simulated], "r4": r4})

    @staticmethod
    def _simulation(ir, ctx):
        """The graph the loss runs: the IR's own, or, when activations or the KV cache will be
        quantized, a copy with those quantizers (and the online Hadamards they act after) in place.
        Returns (graph module, whether R4 is an online node in it, the passes applied to it)."""
        sim = [e for e in ctx.later if e.pass_cls.name in ("insert-hadamard", "quantize-activations", "quantize-kv")]
        if not any(e.pass_cls.name != "insert-hadamard" for e in sim):
            return ir.gm, False, []
        from .pipeline import PassManager
        copy_ir = ir.fork()   # insert-hadamard's new down weights stay in the fork
        PassManager(",".join(e.text() for e in sim)).run(copy_ir)
        return copy_ir.gm, any(e.pass_cls.name == "insert-hadamard" and e.config.r4 for e in sim), \
            [e.text() for e in sim]

    def _load(self, ir, s, path: Path) -> PassResult:
        from safetensors.torch import load_file
        f = path / "extras.safetensors"
        if not f.is_file():
            raise PassFailure(f"load={path}: no learned rotations there (no extras.safetensors)")
        found = {k: v for k, v in load_file(f).items() if k.startswith("rotations.")}
        d = ir.tensor(s.embedding_weight).shape[1]
        if LEARNED_R1 not in found or tuple(found[LEARNED_R1].shape) != (d, d):
            raise PassFailure(f"load={path}: no {d}x{d} R1 for this model")
        ir.extra_tensors.update(found)
        return PassResult(True, {"loaded": str(path), "matrices": len(found)})
