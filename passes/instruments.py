"""Instruments: timing, IR dumps, invariant checks, provenance, numeric diff against contracts."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lowbit.ir import meta
from lowbit.ir.printer import format_ir

from .base import Exact, Lossy, PassFailure
from .pipeline import Instrument


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    wide = ref if ref.dtype in (torch.float32, torch.float64) else ref.float()   # half precision: differences in float32
    noise = torch.linalg.vector_norm(wide - approx, dtype=torch.float64).item()   # sums in float64
    return math.inf if noise == 0 else 20 * math.log10(torch.linalg.vector_norm(ref, dtype=torch.float64).item() / noise)


def rel_err(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return ((ref.double() - approx.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


class Timing(Instrument):
    def __init__(self):
        self.seconds: list[tuple[str, float]] = []

    def before(self, i, entry, p, ir, ctx):
        self._t = time.perf_counter()

    def after(self, i, entry, p, ir, ctx, result):
        dt = time.perf_counter() - self._t
        self.seconds.append((entry.text(), dt))
        ir.stats[-1]["seconds"] = round(dt, 3)


class DumpIR(Instrument):
    """Writes the IR as text before the first pass and after each pass: NN-<pass>.txt. changed_only:
    only after passes that changed it; tree: a directory per pass, NN-<pass>/ holding ir.txt,
    diff.txt (a unified diff from the IR written before it) and stats.json (the pass's stats)."""

    def __init__(self, directory, changed_only: bool = False, tree: bool = False):
        self.dir, self.changed_only, self.tree = Path(directory), changed_only, tree

    def start(self, ir, ctx):
        self.dir.mkdir(parents=True, exist_ok=True)
        self._last = format_ir(ir)
        self._write("00-input", self._last, None, {})

    def after(self, i, entry, p, ir, ctx, result):
        if self.changed_only and not result.modified:
            return
        text = format_ir(ir)
        self._write(f"{i + 1:02d}-{entry.pass_cls.name}", text, self._last, ir.stats[-1])
        self._last = text

    def _write(self, name, text, before, stats):
        if not self.tree:
            (self.dir / f"{name}.txt").write_text(text)
            return
        import difflib
        import json
        d = self.dir / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "ir.txt").write_text(text)
        if before is not None:
            (d / "diff.txt").write_text("".join(difflib.unified_diff(before.splitlines(True), text.splitlines(True),
                                                                     "before", name)))
        (d / "stats.json").write_text(json.dumps(stats, indent=1, default=str))


class Reproducer(Instrument):
    """Keeps the IR before each pass (a copy sharing its tensors) and, when the pass fails or
    breaks its contract under NumericDiff, writes a directory that reruns exactly that pass
    (`lowbit debug repro DIR`): the IR before it (an artifact), the pass's text, the seed, the
    calibration windows and the numeric-diff inputs it had."""

    def __init__(self, directory, diff_inputs=None):
        self.dir, self.diff_inputs, self.written = Path(directory), diff_inputs, None

    def before(self, i, entry, p, ir, ctx):
        self._before = ir.fork()
        self._before.passes_run, self._before.stats = list(ir.passes_run), list(ir.stats)
        self._before.extra_tensors = dict(ir.extra_tensors)

    def failed(self, i, entry, p, ir, ctx, error):
        import json

        from safetensors.torch import save_file

        from lowbit.ir.artifact import save_artifact
        save_artifact(self._before, self.dir / "before", {"seed": ctx.seed, "reproducer": True}, force=True)
        tensors = {k: v.contiguous() for k, v in (("calib", ctx.calib), ("diff_inputs", self.diff_inputs)) if v is not None}
        if tensors:
            save_file(tensors, str(self.dir / "inputs.safetensors"))
        (self.dir / "repro.json").write_text(json.dumps(
            {"pass": entry.text(), "index": i + 1, "seed": ctx.seed, "passes_before": list(self._before.passes_run),
             "diff": self.diff_inputs is not None, "error": str(error)}, indent=1))
        self.written = self.dir


class Verify(Instrument):
    """After each pass: the graph lints, every node has a unique debug handle, every get_attr
    names a tensor, floating tensors are finite, no dead nodes, and the structure still analyses."""

    def after(self, i, entry, p, ir, ctx, result):
        verify(ir)


def verify(ir):
    ir.graph.lint()
    seen = {}
    for n in ir.graph.nodes:
        h = n.meta.get(meta.HANDLE)
        if h is None:
            raise PassFailure("node has no debug handle", n)
        if h in seen:
            raise PassFailure(f"debug handle {h} also on node '{seen[h].name}'", n)
        seen[h] = n
        if n.op == "get_attr":
            try:
                t = ir.tensor(n.target)
            except (KeyError, AttributeError):
                raise PassFailure(f"get_attr of missing tensor '{n.target}'", n) from None
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise PassFailure(f"tensor '{n.target}' has NaN or Inf", n)
        if n.op not in ("output", "placeholder") and not n.users:
            raise PassFailure("dead node left in the graph", n)
    ir._analysis = None
    ir.analysis  # raises StructureError if the pass broke the structure


class Provenance(Instrument):
    """Stamps the pass name on every node a pass created."""

    def before(self, i, entry, p, ir, ctx):
        self._old = set(ir.graph.nodes)

    def after(self, i, entry, p, ir, ctx, result):
        for n in ir.graph.nodes:
            if n not in self._old:
                n.meta[meta.CREATED_BY] = entry.pass_cls.name


class NumericDiff(Instrument):
    """Runs fixed inputs before and after each pass and checks the pass's contract."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs
        self.report: list[dict] = []

    def start(self, ir, ctx):
        self._ref = ir(self.inputs)

    def after(self, i, entry, p, ir, ctx, result):
        out = ir(self.inputs)
        c = p.contract()
        row = {"pass": entry.text(), "contract": str(c), "rel_err": rel_err(self._ref, out),
               "sqnr_db": sqnr_db(self._ref, out)}
        self.report.append(row)
        ir.stats[-1]["diff"] = {k: row[k] for k in ("rel_err", "sqnr_db")}
        if isinstance(c, Exact) and not row["rel_err"] <= c.rtol:
            raise PassFailure(f"broke its exact contract: relative error {row['rel_err']:.3g} > {c.rtol:g}")
        if isinstance(c, Lossy) and not row["sqnr_db"] >= c.min_sqnr_db:
            raise PassFailure(f"broke its lossy contract: SQNR {row['sqnr_db']:.2f} dB < {c.min_sqnr_db:g} dB")
        self._ref = out
