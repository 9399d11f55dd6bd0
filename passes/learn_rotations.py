from __future__ import annotations

import itertools
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from lowbit.ir.artifact import scratch_dir
from lowbit.ir.formats.uniform import fake_quantize
from lowbit.ir.hadamard import hadamard_matrix, kron_hadamard, kron_rotate, random_hadamard, random_orthogonal, supported
from lowbit.ir.load import heap_temporaries
from lowbit.ir.quant import quantize_tokens_lsq
from lowbit.ir.store import OnDemand

from .base import Exact, Needs, Pass, PassContext, PassFailure, PassResult, register
from .fuse_rotations import (LEARNED_R1, FuseRotations, check_head_path, check_rotatable, learned_r2, per_query_head,
                             rotated_tensors, smooth_down, smooth_v)
from .insert_hadamard import InsertHadamard, learned_r3, learned_r4
from .quantize_activations import QuantizeActivations, QuantizeKV, linear_roles
from .quantize_weights import QuantizeWeights


class _Rows:
    """A float32 matrix in a file: rows appended a block at a time, read back by position. What
    loss=local records (7 GB on a 135M model) lives on disk; a step reads its rows back."""

    def __init__(self, path: Path, width: int):
        self.path, self.width = path, width

    def append(self, rows: torch.Tensor):
        with open(self.path, "ab") as f:
            rows.float().contiguous().numpy().tofile(f)

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        n = -1 if stop is None else (stop - start) * self.width
        a = np.fromfile(self.path, np.float32, count=n, offset=start * self.width * 4)
        return torch.from_numpy(a).view(-1, self.width)

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        """The rows at `pos`, read one run of consecutive positions at a time."""
        runs = torch.tensor_split(pos, ((pos.diff() != 1).nonzero().flatten() + 1).tolist())
        return torch.cat([self.read(int(r[0]), int(r[-1]) + 1) for r in runs])


def _keeper(directory: Path | None):
    """m -> a function returning m: m itself, or, given a directory (a model left on disk), a file
    there read back at each call, so that the loss's matrices are in memory one at a time."""
    count = itertools.count()

    def keep(m: torch.Tensor):
        if directory is None:
            return lambda: m
        rows = _Rows(directory / f"kept{next(count)}.f32", m.shape[-1])
        rows.append(m)
        return rows.read
    return keep


def _record(ir, nodes, seqs, into: Path, progress: bool = False, batch: int = 4, norms=()) -> tuple[dict, dict]:
    """The values of `nodes` over the calibration sequences, as [tokens, width] rows (one forward
    pass, each weight read when its node runs), each in a file under `into`; and of the nodes in
    `norms`, each row's squared norm (in memory). Returns ({node: _Rows}, {node: squared norms})."""
    rows_of, norms_of = dict.fromkeys(nodes), {n: [] for n in norms}

    class Recorder(OnDemand):
        def run_node(self, n):
            out = super().run_node(n)
            if n in rows_of or n in norms_of:
                v = out.detach().float()
                if v.dim() == 4:   # [batch, heads, seq, head_dim]: one row per token, heads side by side
                    v = v.transpose(1, 2).flatten(-2)
                rows = v.reshape(-1, v.shape[-1])
                if n in norms_of:
                    norms_of[n].append(rows.square().sum(-1))
                if n in rows_of:
                    if rows_of[n] is None:
                        rows_of[n] = _Rows(into / f"{n.name}.f32", rows.shape[-1])
                    rows_of[n].append(rows)
            return out
    with torch.no_grad():
        for i in tqdm(range(0, len(seqs), batch), desc="learn-rotations: recording", disable=not progress, leave=False):
            Recorder(ir).run(seqs[i: i + batch])
    return rows_of, {n: torch.cat(v) for n, v in norms_of.items()}


def _per_head_fn(r, k):
    """x -> each head rotated by r, quantized per token and head group as quantize-kv (config k) stores
    it, rotated back."""
    return lambda x: _per_head(x, r, lambda y: quantize_tokens_lsq(
        y.unflatten(-1, (-1, len(r))), k.bits, k.group, k.sym, k.clip).flatten(-2))


def _per_head(x, r2, quant):
    """X [tokens, heads * head_dim] with each head rotated by R2, quantized by `quant`, rotated back."""
    y = quant((x.unflatten(-1, (-1, len(r2))) @ r2).flatten(-2))
    return (y.unflatten(-1, (-1, len(r2))) @ r2.T).flatten(-2)


@dataclass
class Term:
    """One term of loss=local: the recorded value `node` (columns `cols` of it), e -> the output
    energy an error e causes at the linears reading it (per row), the quantize-and-rotate-back
    function `err` whose error is measured, and the residual stream value the readers' output is
    added to (each token then weighted by 1 / ||h||^2), if any."""
    node: fx.Node
    cols: torch.Tensor | None
    energy: Callable
    err: Callable
    residual: fx.Node | None = None


def _r1_terms(ir, s, a, quant_a, r1, keep) -> list[Term]:
    """R1: each block norm's output (and the final norm's, when lm_head's input is quantized) into
    the linears reading it, unless their role is skipped."""
    roles = linear_roles(s)
    terms = []
    for n in [b.norm for b in s.blocks] + ([s.final_norm] if a.lm_head else []):
        ws = [ir.tensor(lin.weight).float().reshape(lin.rows, -1) for lin in n.consumers   # experts: all rows
              if roles.get(lin.node) not in a.skipped and (a.lm_head or lin is not s.lm_head)]
        if ws:
            terms.append(Term(n.output, None, _out_energy(torch.cat(ws), keep), lambda x: quant_a(x @ r1) @ r1.T))
    return terms


SMOOTH_LR = 0.01   # Adam's step on the log-scales (0.03 measured worse on the SmolLM2 proxy: 37.48 vs 37.18)


def _scaled(err, log_s, expand=lambda s: s):
    """err with its input divided per channel by exp(log_s) (widened by `expand`) and its output
    multiplied back; no scales: err itself."""
    if log_s is None:
        return err

    def f(x):
        s = expand(log_s.exp())
        return err(x / s) * s
    return f


def _out_energy(w, keep):
    """e -> ||e W^T||^2 per row, through W^T or the Gram matrix W^T W, whichever is smaller (kept by `keep`)."""
    if w.shape[0] <= w.shape[1]:
        wt = keep(w.T.contiguous())
        return lambda e: (e @ wt()).square().sum(-1)
    g = keep(w.T @ w)
    return lambda e: ((e @ g()) * e).sum(-1)


def _start(n: int, seed: int) -> torch.Tensor:
    return random_hadamard(n, seed) if supported(n) else random_orthogonal(n, seed)


def cayley_step(r: torch.Tensor, grad: torch.Tensor, lr: float, scale: float = 1.0) -> torch.Tensor:
    """One Cayley SGD step on the orthogonal group (as SpinQuant's SGDG): the Riemannian gradient
    A R with A = G R^T - R G^T skew-symmetric, step size min(lr, 1/||A||_1) (lr <= 0: the bound
    alone) times `scale`, and the Cayley retraction (I + a/2 A)^-1 (I - a/2 A) R, which keeps R
    exactly orthogonal."""
    a = grad @ r.T - r @ grad.T
    bound = 1.0 / (torch.linalg.matrix_norm(a, ord=1).item() + 1e-8)
    alpha = (min(lr, bound) if lr > 0 else bound) * scale
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + alpha / 2 * a, (eye - alpha / 2 * a) @ r)


@register
class LearnRotations(Pass):
    """Learn R1 and R2 (SpinQuant): Cayley SGD from random Hadamard, minimizing the LM loss under the later
    quantizers (loss=ce) or the output error the later activation/KV quantizers cause at each linear (loss=local).
    With a later insert-hadamard{kind=learned}, loss=local also learns each layer's online R4 (A kron B, from H_n)."""
    name = "learn-rotations"
    applications = "`rotations`: every matrix is learned together"
    changes_basis = True
    needs = (Needs("fold-norms"), Needs("fuse-rotations", before=False, match=(("kind", "learned"),)),
             Needs("quantize-weights", before=False, when=(("loss", "ce"), ("load", ""))),
             Needs("quantize-activations", before=False, when=(("loss", "local"), ("load", ""))))
    reads_later = (FuseRotations, InsertHadamard, QuantizeWeights, QuantizeActivations, QuantizeKV)

    @dataclass(frozen=True)
    class Config:
        steps: int = 50
        lr: float = 0.05    # cap on the Cayley step (SpinQuant: 1.5; 0.05 measured best on stories260K); 0: no cap
        calib: int = 128    # calibration sequences (cycled through)
        seq: int = 256      # tokens per sequence
        batch: int = 2      # sequences per step
        seed: int = 0
        load: str = ""      # an artifact directory whose learned rotations to reuse instead of learning
        loss: str = "ce"      # "ce": the model's next-token loss; "local": each linear's output error from its quantized input
        decay: bool = False   # steps shrink linearly to 0 over the run (SpinQuant's schedule)
        smooth: bool = False  # loss=local: also learn per-channel scales on the values and the down input

        def __post_init__(self):
            if self.loss not in ("ce", "local"):
                raise ValueError(f"loss must be ce or local, got {self.loss!r}")
            if self.smooth and self.loss != "local":
                raise ValueError("smooth=true is learned by loss=local only")

    def contract(self):
        return Exact(0.0)   # records matrices beside the graph; the function is untouched

    def run(self, ir, ctx: PassContext) -> PassResult:
        c = self.config
        if LEARNED_R1 in ir.extra_tensors:
            return PassResult(False, {"already": True})
        if not ctx.applies("rotations"):   # one application: every matrix is learned together
            return PassResult(False)
        s = ir.analysis
        if c.load:
            return self._load(ir, s, Path(c.load))
        if c.loss == "ce":   # loss=local streams: it records values in one forward pass and reads them back
            ir.whole("learn-rotations{loss=ce} (gradients through the model; loss=local streams)")
            s = ir.analysis
        if ctx.calib is None:
            raise PassFailure("needs calibration text (compile --calib FILE)")
        check_rotatable(s)
        fuse = next(e for e in ctx.following(FuseRotations) if e.config.kind == "learned").config
        if fuse.r2:
            for a in s.attentions:
                check_head_path(a)
        h = next((e.config for e in ctx.following(InsertHadamard)), None)
        r4, online_learned = h is not None and h.r4, h is not None and h.kind == "learned"
        if online_learned and c.loss != "local":
            raise PassFailure("insert-hadamard{kind=learned} follows: R3 and R4 are learned by loss=local only")
        seqs = ctx.calib[:, : ctx.calib.shape[1] // c.seq * c.seq].reshape(-1, c.seq)[: c.calib]
        if len(seqs) == 0:
            raise PassFailure(f"calibration windows are shorter than seq={c.seq}")
        if c.loss == "ce" and any(b.post_norm is not None for b in s.blocks):
            raise PassFailure("loss=ce does not simulate the online R1 after post-norms; use loss=local",
                              next(b.post_norm.output for b in s.blocks if b.post_norm is not None))
        r1, r2s, r4s, r3s = self._starts(ir, s, fuse.r2, online_learned and r4, online_learned and h.r3)
        smooth = {}   # extra-tensor key -> log-scale, learned by Adam beside the rotations
        scratch = scratch_dir("lowbit-learn-")   # the recorded values (a killed compile's are removed)
        try:
            if c.loss == "local":
                parts, batch_at, under = self._local(ir, s, ctx, seqs, r1, r2s, r4s, smooth, r3s, scratch)
            else:
                parts, batch_at, under = self._end_to_end(ir, s, ctx, seqs, r1, r2s,
                                                            ctx.following(QuantizeWeights)[0], r4)
            learned = [r1, *r2s, *[f for ab in r4s for f in ab], *r3s]
            stats = self._optimize(parts, batch_at, learned, smooth, ctx.progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ir.extra_tensors[LEARNED_R1] = r1.detach().double()
        for i, r in enumerate(r2s):
            ir.extra_tensors[learned_r2(i)] = r.detach().double()
        for i, ab in enumerate(r4s):
            for k, f in zip(learned_r4(i), ab):
                ir.extra_tensors[k] = f.detach().double()
        for i, r in enumerate(r3s):
            ir.extra_tensors[learned_r3(i)] = r.detach().double()
        for k, t in smooth.items():
            ir.extra_tensors[k] = t.detach().double().exp()
        return PassResult(True, {"steps": c.steps, "tokens": c.steps * c.batch * c.seq, **stats,
                                 "learned_under": under, "r4": "learned" if r4s else r4,
                                 "r3": "learned" if r3s else None})

    def _starts(self, ir, s, r2: bool, r4: bool, r3: bool):
        """Where each rotation starts: R1 and R2 randomized Hadamards (seeded), R4 H_n as A kron B,
        R3 insert-hadamard's own H_hd; [] for those not learned."""
        seed = self.config.seed
        d = ir.placeholder(s.embedding_weight).shape[1]
        r1 = _start(d, seed).float().requires_grad_()
        r2s = [_start(a.head_dim, seed + 1 + i).float().requires_grad_() for i, a in enumerate(s.attentions)] \
            if r2 else []
        r4s = [[f.float().requires_grad_() for f in kron_hadamard(m.down.in_features)] for m in s.mlps] if r4 else []
        r3s = [(hadamard_matrix(a.head_dim) / math.sqrt(a.head_dim) if supported(a.head_dim)
                else random_orthogonal(a.head_dim, seed)).float().requires_grad_() for a in s.attentions] \
            if r3 else []
        return r1, r2s, r4s, r3s

    def _optimize(self, parts, batch_at, learned, smooth, progress) -> dict:
        """Cayley SGD on the rotations, Adam on the smoothing log-scales; the loss of a fixed batch
        before and after (compares like with like). The loss is a sum of parts (`parts(batch)`),
        each differentiated alone and the gradients added, so one part's graph is alive at a time."""
        probe = batch_at(0)
        with torch.no_grad():
            before = sum(p.item() for p in parts(probe))
        t0 = time.perf_counter()
        logs = list(smooth.values())
        adam = torch.optim.Adam(logs, lr=SMOOTH_LR) if logs else None
        with heap_temporaries():
            self._steps(parts, batch_at, learned, logs, adam, progress)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            after = sum(p.item() for p in parts(probe))
        return {"seconds": round(seconds, 1), "probe_loss_before": round(before, 4), "probe_loss_after": round(after, 4)}

    def _steps(self, parts, batch_at, learned, logs, adam, progress):
        c = self.config
        for step in tqdm(range(c.steps), desc="learn-rotations", disable=not progress, leave=False):
            grads = [None] * (len(learned) + len(logs))
            for p in parts(batch_at(step)):
                if not p.requires_grad:   # a term no learned matrix acts on
                    continue
                for i, g in enumerate(torch.autograd.grad(p, learned + logs, allow_unused=True)):
                    grads[i] = g if grads[i] is None else grads[i] if g is None else grads[i] + g
            with torch.no_grad():
                for r, g in zip(learned, grads):
                    if g is None:   # no term reads it (its linears are skipped)
                        continue
                    r.copy_(cayley_step(r.double(), g.double(), c.lr, 1 - step / c.steps if c.decay else 1).float())
            if adam:
                for t, g in zip(logs, grads[len(learned):]):
                    t.grad = g
                adam.step()

    def _end_to_end(self, ir, s, ctx, seqs, r1, r2s, quant, r4):
        """loss=ce: the model's next-token loss on calibration batches, with the rotations fused
        differentiably, every weight fake-quantized (straight-through) on the later quantizer's grid
        (RTN, the proxy for any method), and the later activation/KV quantizers and online Hadamards
        in place. Returns (loss, batch_at, what it ran under)."""
        c = self.config
        qc = quant.config
        spec = qc.spec()
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
            new = dict(rotated_tensors(s, get, r1, r2s))
            params = dict(new)
            for lin in quantized:
                w = new.get(lin.weight, get(lin.weight))
                fq = lambda v, lin=lin: fake_quantize(v.reshape(lin.rows, -1), spec).reshape(v.shape)   # noqa: E731
                if lin.weight in downs:   # R4 is fused into down before quantization
                    h = h4[w.shape[-1]]
                    wq = fq(w @ h)
                    params[lin.weight] = wq if online else wq @ h.T
                else:
                    params[lin.weight] = fq(w)
            logits = torch.func.functional_call(gm, params, (ids,))
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

        def batch_at(step):
            return seqs[torch.arange(step * c.batch, (step + 1) * c.batch) % len(seqs)]
        return lambda ids: [loss_on(ids)], batch_at, [quant.text(), *simulated]

    def _local(self, ir, s, ctx, seqs, r1, r2s, r4s, smooth, r3s, scratch: Path):
        """loss=local: the quantized inputs the rotations act on, recorded once from the float model,
        and a loss that needs no forward pass. Each term is the output error quantization causes at
        the linears reading a value, relative to their output: ||(Q(X R) R^T - X) W^T||^2 / ||X W^T||^2,
        with Q the later quantizer (LSQ's gradient: straight-through rounding, differentiable ranges).
        R1: each block's norm output into the linears reading it. R2 (per attention, head by head):
        the values into the KV cache and the attention output into o, both read by o. R4 (if learned):
        each down projection's input. The o, value and down terms weight each token by 1 / ||h||^2, h
        the residual their output is added to. R3 (if learned): the keys after RoPE into the KV cache,
        their error read by the queries (q (k_hat - k)^T, through each group's query Gram matrix).
        The recorded rows are kept in files under `scratch`, each term's in the order steps read them.
        Returns (loss, batch_at, what it ran under)."""
        c = self.config
        act = ctx.following(QuantizeActivations)[0]
        kv = next(iter(ctx.following(QuantizeKV)), None)
        a = act.config
        quant_a = lambda x: quantize_tokens_lsq(x, a.bits, a.group, a.sym, a.clip)   # noqa: E731
        grams = {}   # post-RoPE query node -> the keys' error metric, filled after recording
        keep = _keeper(scratch if ir.spill is not None else None)
        terms = _r1_terms(ir, s, a, quant_a, r1, keep)
        terms += self._attention_terms(ir, s, a, kv, quant_a, r2s, smooth, keep)
        queries = {att.rope_q: att for att in s.attentions} if r3s and kv is not None else {}
        for att, r3 in zip(s.attentions, r3s if kv is not None else []):
            terms.append(Term(att.rope_k, None, lambda e, q=att.rope_q: ((e @ grams[q]()) * e).sum(-1),
                              _per_head_fn(r3, kv.config)))
        if "down" not in a.skipped:
            terms += self._down_terms(ir, s, quant_a, r4s, smooth, keep)
        residuals = {t.residual for t in terms if t.residual is not None}
        nodes = list(dict.fromkeys([t.node for t in terms] + list(queries)))
        values, sq_norms = _record(ir, nodes, seqs, scratch, ctx.progress, norms=residuals)
        for qn, att in queries.items():   # each cached key head's error through its query heads' Gram matrix
            rows = values.pop(qn)
            heads = values[att.rope_k].width // att.head_dim   # kv heads, or all of them where the graph repeats k first
            q = rows.read().unflatten(-1, (heads, -1, att.head_dim))   # [tokens, key head, query, hd]
            rows.path.unlink()
            grams[qn] = keep(torch.block_diag(*torch.einsum("tgqi,tgqj->gij", q, q) / len(q)))
        tokens = len(seqs) * seqs.shape[1]
        per_step = c.batch * c.seq
        order = torch.randperm(tokens, generator=torch.Generator().manual_seed(c.seed))
        xs, weights, energy = [], [], []   # each term's rows, in the order the steps read them
        last = {t.node: i for i, t in enumerate(terms)}
        for i, t in enumerate(terms):
            x = values[t.node].read()
            if last[t.node] == i:   # its last reader: the recorded file goes as its rows are rewritten
                values.pop(t.node).path.unlink()
            x = x if t.cols is None else x[:, t.cols]
            # a token's error counts relative to the residual it is added to (the next norm divides by
            # it): weight 1 / ||h||^2 per token, so a few tokens with massive activations do not set the loss
            w = None if t.residual is None else 1 / sq_norms[t.residual]
            en = t.energy(x) if w is None else t.energy(x) * w
            xs.append(_Rows(scratch / f"term{i}.f32", x.shape[1]))
            xs[-1].append(x[order])
            weights.append(None if w is None else w[order])
            energy.append(en[order])

        def batch_at(step):   # positions in `order`
            return torch.arange(step * per_step, (step + 1) * per_step) % tokens

        def parts(pos):   # the loss: the mean of the terms
            for x, w, en, t in zip(xs, weights, energy, terms):
                x = x.take(pos)
                e = t.energy(t.err(x) - x)
                yield (e if w is None else e * w[pos]).sum() / en[pos].sum() / len(terms)
        return parts, batch_at, [e.text() for e in (act, kv) if e is not None]

    def _attention_terms(self, ir, s, a, kv, quant_a, r2s, smooth, keep) -> list[Term]:
        """R2, per attention: the values into the KV cache (if quantized) and o's input (unless
        skipped), both read through o, with the values' learned scales when smooth=true."""
        terms = []
        home = {id(b.attention): b.norm.input for b in s.blocks if b.attention}   # the residual o writes into
        for i, (att, r2) in enumerate(zip(s.attentions, r2s)):
            wo = ir.tensor(att.o.weight).float()
            sv = smooth.setdefault(smooth_v(i), torch.zeros(len(att.v_rows), requires_grad=True)) \
                if self.config.smooth else None
            if kv is not None:   # a head's value error reaches o through that head's columns (averaged over heads)
                heads = wo.reshape(len(wo), -1, att.head_dim)
                g = torch.einsum("ohi,ohj->ij", heads, heads) / heads.shape[1]
                gv = keep(torch.block_diag(*[g] * (len(att.v_rows) // att.head_dim)))
                terms.append(Term(att.v.node, att.v_rows, lambda e, gv=gv: ((e @ gv()) * e).sum(-1),
                                  _scaled(_per_head_fn(r2, kv.config), sv), home[id(att)]))
            if "o" not in a.skipped:
                terms.append(Term(att.o.node.args[0], None, _out_energy(wo, keep),
                                  _scaled(lambda x, r2=r2: _per_head(x, r2, quant_a), sv,
                                          lambda v, att=att: per_query_head(v, att)),
                                  home[id(att)]))
        return terms

    def _down_terms(self, ir, s, quant_a, r4s, smooth, keep) -> list[Term]:
        """Learned R4, per MLP: the down projection's input, with learned scales (smooth=true, gated
        MLPs with separate gate and up). Not for routed experts (their R4 stays the Hadamard it
        starts from)."""
        terms = []
        home = {id(b.mlp): b.norm.input for b in s.blocks if b.mlp}
        for i, (m, (a4, b4)) in enumerate(zip(s.mlps, r4s)):
            if m.down.experts:   # routed rows, sorted by expert, are not one per token: R4 keeps its start
                continue
            sd = smooth.setdefault(smooth_down(i), torch.zeros(m.down.in_features, requires_grad=True)) \
                if self.config.smooth and m.gate is not None and not m.fused_gate_up else None
            wd = ir.tensor(m.down.weight).float().reshape(m.down.rows, -1)   # experts: every expert's rows
            terms.append(Term(m.down.node.args[0], None, _out_energy(wd, keep),
                              _scaled(lambda x, a4=a4, b4=b4: kron_rotate(quant_a(kron_rotate(x, a4, b4)), a4, b4,
                                                                          inverse=True), sd),
                              home[id(m)]))
        return terms

    def _simulation(self, ir, ctx):
        """The graph the loss runs: the IR's own, or, when activations or the KV cache will be
        quantized, a copy with those quantizers (and the online Hadamards they act after) in place.
        Returns (graph module, whether R4 is an online node in it, the passes applied to it)."""
        from .pipeline import Entry, PassManager
        quantizers = ctx.following(QuantizeActivations) + ctx.following(QuantizeKV)
        if not quantizers:
            return ir.gm, False, []
        sim = ctx.following(InsertHadamard) + quantizers   # the order check_order guarantees
        copy_ir = ir.fork()   # insert-hadamard's new down weights stay in the fork
        PassManager(sim, done=[Entry(type(self), self.config, ())]).run(copy_ir)
        return copy_ir.gm, any(e.config.r4 for e in ctx.following(InsertHadamard)), [e.text() for e in sim]

    def _load(self, ir, s, path: Path) -> PassResult:
        from safetensors.torch import load_file
        f = path / "extras.safetensors"
        if not f.is_file():
            raise PassFailure(f"load={path}: no learned rotations there (no extras.safetensors)")
        found = {k: v for k, v in load_file(f).items() if k.startswith(("rotations.", "smooth."))}
        d = ir.placeholder(s.embedding_weight).shape[1]
        if LEARNED_R1 not in found or tuple(found[LEARNED_R1].shape) != (d, d):
            raise PassFailure(f"load={path}: no {d}x{d} R1 for this model")
        ir.extra_tensors.update(found)
        return PassResult(True, {"loaded": str(path), "matrices": len(found)})
