"""`lowbit debug compare`: where two runs of a model part ways, value by value.

A side is a source model, an artifact, or an ONNX file lowbit exported, run by the torch reference
runtime, by onnxruntime (an artifact on `ort` is exported with its taps first) or by the CUDA
plugins' kernels (`cuda`: lowered to their ops, on the GPU). Both run the
same token windows (read from a text, or from an inputs file a comparison saved) and record their
taps: every linear's output, the residual stream after every block, the logits; taps are matched
by debug handle, which capture gives every node and every rewrite passes on to its replacement.

Values inside a model are compared in one basis: where one side is the source of the other, the
source is first put through the passes of the other's pipeline that change the basis of inner
values (rotations, LayerNorm centering: `Pass.changes_basis`), which are exact, so that the two
differ only by what the lossy passes did. An ONNX file carries which of its values hold which
tap (`lowbit.taps` in its metadata); onnxruntime is asked for them as extra outputs, which keeps
it from fusing across them: what it fuses in the file as deployed is listed beside the table."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowbit.ir import meta
from lowbit.ir.errors import LowbitError, StructureError
from lowbit.ir.graph import IR, short_name
from lowbit.ir.store import OnDemand

LOGITS = 0   # the logits' tap handle (debug handles start at 1)
BACKENDS = ("torch", "ort", "cuda")


@dataclass
class Tap:
    handle: int
    kind: str   # linear | block | logits
    name: str


def taps_of(ir: IR) -> tuple[list[Tap], str | None]:
    """The IR's taps in execution order, and why block taps are missing (a structure the
    analysis does not read), if they are."""
    names = {}
    for lin in ir.linears.linears.values():
        names[lin.node] = ("linear", short_name(lin.name))
    why = None
    try:
        s = ir.analysis
        layer = 0
        for i, b in enumerate(s.blocks):
            what = "attention" if b.attention and not b.mlp else "mlp" if b.mlp and not b.attention else "parallel"
            layer += what != "mlp"
            names.setdefault(b.add, ("block", f"block {i} (layer {max(layer - 1, 0)} {what})"))
    except StructureError as e:
        why = f"no block taps: {e}"
    taps = [Tap(n.meta[meta.HANDLE], *names[n]) for n in ir.graph.nodes if n in names and meta.HANDLE in n.meta]
    return taps + [Tap(LOGITS, "logits", "logits")], why


class _Record(OnDemand):
    """Runs the graph node by node (weights on disk read as used), keeping the values of tap nodes."""

    def __init__(self, ir, handles):
        super().__init__(ir)
        self.handles, self.values = set(handles), {}

    def run_node(self, n):
        v = super().run_node(n)
        h = n.meta.get(meta.HANDLE)
        if h in self.handles and isinstance(v, torch.Tensor):
            self.values[h] = v.detach().float().clone()
        return v


@torch.no_grad()
def record_torch(ir: IR, ids: torch.Tensor, handles) -> dict[int, torch.Tensor]:
    rec = _Record(ir, handles)
    out = rec.run(ids)
    return {**rec.values, LOGITS: out.float()}


class _Keep(torch.fx.Interpreter):
    def __init__(self, gm, handles):
        super().__init__(gm)
        self.handles, self.values = set(handles), {}

    def run_node(self, n):
        v = super().run_node(n)
        if n.meta.get(meta.HANDLE) in self.handles and isinstance(v, torch.Tensor):
            self.values[n.meta[meta.HANDLE]] = v.detach().float().cpu()
        return v


@torch.no_grad()
def record_kernels(ir: IR, ids: torch.Tensor, handles, device: str = "cuda") -> dict[int, torch.Tensor]:
    """Tap values of the IR lowered to the CUDA plugins' kernel ops (lower-kernels{target=cuda}) and
    run on `device`: the kernels on a GPU, the ops' PyTorch implementations on the CPU."""
    from lowbit.tools.generate import on_device
    gm, _ = on_device(ir.fork(), device, lower=True)
    rec = _Keep(gm, handles)
    out = rec.run(ids.to(device))
    return {**rec.values, LOGITS: out.float().cpu()}


@dataclass
class Side:
    spec: str
    backend: str
    ir: IR | None          # the IR this side runs (torch) or was exported from (ort), None for a bare ONNX file
    onnx: Path | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.spec} ({self.backend})"

    @property
    def is_source(self) -> bool:
        return self.ir is not None and not self.ir.passes_run


def open_side(spec: str, backend: str = "torch", tmp: Path | None = None) -> Side:
    """A model, an artifact or an ONNX file, to run on `backend` (torch, ort, cuda)."""
    from lowbit.ir.artifact import is_artifact, read_manifest
    from lowbit.tools import api
    if backend not in BACKENDS:
        raise LowbitError(f"backend must be one of {', '.join(BACKENDS)}, not '{backend}'")
    if backend == "cuda" and not torch.cuda.is_available():
        raise LowbitError("backend cuda: torch sees no CUDA device")
    p = Path(spec)
    if p.suffix == ".onnx" and p.is_file():
        if backend != "ort":
            raise LowbitError(f"{spec}: an ONNX file runs on onnxruntime (backend ort)")
        return Side(spec, "ort", None, p)
    ir = api.load(spec)
    seed = read_manifest(spec).get("seed", 0) if is_artifact(spec) else 0
    side = Side(spec, backend, ir, seed=seed)
    if backend == "ort":
        from lowbit.backends.onnx import export_onnx
        side.onnx = export_onnx(ir, Path(tmp) / f"{len(list(Path(tmp).iterdir()))}.onnx", "ort", accuracy_level=4)
    return side


def align(a: Side, b: Side) -> list[str]:
    """Put a source side through the basis-changing passes of the other side's pipeline (exact, so
    the function is the same), so inner values of both are in one basis; returns what was done."""
    from lowbit.passes import PassContext, PassManager
    from lowbit.passes.pipeline import parse_entry
    for src, other in ((a, b), (b, a)):
        if src.is_source and other.ir is not None and other.ir.passes_run:
            replay = [e for e in map(parse_entry, other.ir.passes_run) if e.pass_cls.changes_basis]
            if not replay:
                return []
            src.ir.extra_tensors = dict(other.ir.extra_tensors)   # learned rotations: reused, not learned again
            PassManager(replay).run(src.ir, PassContext(seed=other.seed, progress=False))
            text = ",".join(e.text() for e in replay)
            return [f"{src.label} put through {text} (exact passes of {other.spec}'s pipeline) so that inner values "
                    "of both are in one basis"]
    return []


def record(side: Side, ids: torch.Tensor, taps: list[Tap]) -> tuple[dict[int, torch.Tensor], dict]:
    """The side's tap values on ids, and, for onnxruntime, which taps it fuses in the file as deployed."""
    if side.backend == "torch":
        return record_torch(side.ir, ids, [t.handle for t in taps]), {}
    if side.backend == "cuda":
        return record_kernels(side.ir, ids, [t.handle for t in taps]), {}
    from lowbit.backends.onnx import run_taps
    return run_taps(side.onnx, ids, {t.handle for t in taps})


def metrics(a: torch.Tensor, b: torch.Tensor) -> dict:
    from lowbit.passes.instruments import sqnr_db
    bad_a, bad_b = int((~torch.isfinite(a)).sum()), int((~torch.isfinite(b)).sum())
    row = {"nonfinite_a": bad_a, "nonfinite_b": bad_b}
    if a.shape != b.shape:
        return {**row, "error": f"shapes differ: {list(a.shape)} and {list(b.shape)}"}
    if bad_a or bad_b:
        return row
    d = (a.double() - b.double()).abs()
    cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()
    db = sqnr_db(a, b)
    return {**row, "sqnr_db": db if math.isfinite(db) else None, "max_abs": d.max().item(), "mean_abs": d.mean().item(),
            "cosine": cos}


def compare(a_spec: str, b_spec: str, *, text=None, inputs=None, save_inputs=None, windows: int = 2, ctx: int = 128,
            a_backend: str = "torch", b_backend: str = "torch", min_sqnr: float = 20.0) -> dict:
    """Compare two sides tap by tap on the same token windows (see the module doc)."""
    import tempfile

    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory() as tmp:
        a, b = open_side(a_spec, a_backend, Path(tmp)), open_side(b_spec, b_backend, Path(tmp))
        ids = _inputs(a, b, text, inputs, windows, ctx)
        if save_inputs:
            Path(save_inputs).parent.mkdir(parents=True, exist_ok=True)
            save_file({"input_ids": ids.contiguous()}, str(save_inputs))
        notes = align(a, b) + [f"{s.label}: exported here to ONNX, MatMulNBits at accuracy level 4 (int8 activations) "
                               "as deployed" for s in (a, b) if s.backend == "ort" and s.ir is not None]
        ref = a.ir if a.ir is not None else b.ir
        if ref is None:
            raise LowbitError("compare needs a model or an artifact on one side (two bare ONNX files have no taps in common "
                              "lowbit knows of)")
        taps, why = taps_of(ref)
        if why:
            notes.append(why)
        if a.ir is not None and b.ir is not None and not (a.is_source or b.is_source):
            basis = [[e for e in s.ir.passes_run if _changes_basis(e)] for s in (a, b)]
            if basis[0] != basis[1]:
                notes.append(f"the two pipelines change the basis differently ({basis[0] or 'none'} and {basis[1] or 'none'}): "
                             "inner values are not comparable, only the logits are")
                taps = [t for t in taps if t.kind == "logits"]
        va, fused_a = record(a, ids, taps)
        vb, fused_b = record(b, ids, taps)
    rows = []
    for t in taps:
        if t.handle not in va or t.handle not in vb:
            missing = " and ".join(s.label for s, v in ((a, va), (b, vb)) if t.handle not in v)
            rows.append({"handle": t.handle, "kind": t.kind, "name": t.name, "missing": missing})
            continue
        rows.append({"handle": t.handle, "kind": t.kind, "name": t.name, **metrics(va[t.handle], vb[t.handle])})
    first = next((r for r in rows if _crossed(r, min_sqnr)), None)
    measured = [r for r in rows if r.get("sqnr_db") is not None and r["kind"] != "logits"]
    worst = min(measured, key=lambda r: r["sqnr_db"], default=None)
    by_handle = {t.handle: t.name for t in taps}
    fused = {by_handle[h]: op for h, op in {**fused_a, **fused_b}.items() if h in by_handle}
    return {"a": a.label, "b": b.label, "inputs": {"windows": ids.shape[0], "ctx": ids.shape[1],
                                                   "from": str(inputs or text)},
            "min_sqnr_db": min_sqnr, "notes": notes, "rows": rows, "first_crossing": first, "worst": worst,
            "nonfinite": [r["name"] for r in rows if r.get("nonfinite_a") or r.get("nonfinite_b")],
            "onnxruntime": "ort" in (a.backend, b.backend), "fused_by_onnxruntime": fused}


def _changes_basis(entry_text: str) -> bool:
    from lowbit.passes.pipeline import parse_entry
    return parse_entry(entry_text).pass_cls.changes_basis


def _crossed(r: dict, min_sqnr: float) -> bool:
    if r.get("nonfinite_a") or r.get("nonfinite_b") or r.get("error"):
        return True
    return "sqnr_db" in r and r["sqnr_db"] is not None and r["sqnr_db"] < min_sqnr


def _inputs(a: Side, b: Side, text, inputs, n: int, ctx: int) -> torch.Tensor:
    from safetensors.torch import load_file

    from lowbit.tools.evaluate import read_text, windows
    if inputs:
        try:
            ids = load_file(str(inputs))["input_ids"]
        except Exception as e:
            raise LowbitError(f"{inputs}: not an inputs file lowbit saved ({type(e).__name__}: {e})") from None
        return ids.long()
    if not text:
        raise LowbitError("give --text FILE (token windows from it) or --inputs FILE (saved by --save-inputs)")
    tok = next((s.ir.tokenizer for s in (a, b) if s.ir is not None and s.ir.tokenizer is not None), None)
    if tok is None:
        raise LowbitError("neither side carries a tokenizer: give --inputs FILE")
    return windows(tok.encode(read_text(text)), ctx, n * ctx)


def markdown(rep: dict) -> str:
    lines = [f"A: {rep['a']}", f"B: {rep['b']}",
             f"inputs: {rep['inputs']['windows']} windows x {rep['inputs']['ctx']} tokens from {rep['inputs']['from']}"]
    lines += [f"note: {n}" for n in rep["notes"]]
    first = rep["first_crossing"]
    lines.append("first below {:g} dB: {}".format(rep["min_sqnr_db"], f"{first['name']} (handle {first['handle']})"
                                                  if first else "none"))
    if rep["worst"]:
        lines.append(f"lowest: {rep['worst']['name']} ({rep['worst']['sqnr_db']:.2f} dB)")
    if rep["nonfinite"]:
        lines.append(f"NaN/Inf in: {', '.join(rep['nonfinite'])}")
    lines += ["", "| tap | kind | handle | SQNR dB | max abs | mean abs | cosine | |", "|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if "missing" in r:
            lines.append(f"| {r['name']} | {r['kind']} | {r['handle']} | | | | | not in {r['missing']} |")
            continue
        if "sqnr_db" not in r:
            why = r.get("error") or f"NaN/Inf: {r['nonfinite_a']} in A, {r['nonfinite_b']} in B"
            lines.append(f"| {r['name']} | {r['kind']} | {r['handle']} | | | | | {why} |")
            continue
        db = "exact" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}"
        flag = "<- first" if r is first else ("below" if _crossed(r, rep["min_sqnr_db"]) else "")
        lines.append(f"| {r['name']} | {r['kind']} | {r['handle']} | {db} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                     f"{r['cosine']:.6f} | {flag} |")
    if rep["fused_by_onnxruntime"]:
        lines += ["", "onnxruntime fuses these taps in the file as deployed (here they are outputs, computed apart):"]
        lines += [f"- {name}: inside {op}" for name, op in rep["fused_by_onnxruntime"].items()]
    elif rep["onnxruntime"]:
        lines += ["", "onnxruntime's graph optimizations fuse none of these taps in the file as deployed: each is "
                      "computed as it is here"]
    return "\n".join(lines) + "\n"


def write_json(rep: dict) -> str:
    return json.dumps(rep, indent=1)


# -- bisect -------------------------------------------------------------------------------------------
def snapshot(ir: IR) -> IR:
    """A copy to run passes on, sharing the tensors (passes replace them, never write into them)."""
    fork = ir.fork()
    fork.passes_run, fork.stats = list(ir.passes_run), list(ir.stats)
    fork.extra_tensors, fork.scratch = dict(ir.extra_tensors), dict(ir.scratch)
    return fork


class Criterion:
    """What counts as broken: perplexity on the windows above max_ppl, logits SQNR against the
    model as loaded below min_sqnr, or a NaN/Inf in the logits (and, always, a pass error)."""

    def __init__(self, ir0: IR, win: torch.Tensor, max_ppl=None, min_sqnr=None, nan=False):
        if max_ppl is None and min_sqnr is None and not nan:
            raise LowbitError("give a criterion: --max-ppl X, --min-sqnr DB or --nan")
        self.win, self.max_ppl, self.min_sqnr, self.nan = win, max_ppl, min_sqnr, nan
        self.ref = self._logits(ir0) if min_sqnr is not None else None

    @torch.no_grad()
    def _logits(self, ir) -> torch.Tensor:
        return torch.cat([ir(self.win[i:i + 4]) for i in range(0, len(self.win), 4)]).float()

    def broken(self, ir) -> str | None:
        """Why ir is broken, or None."""
        import torch.nn.functional as F

        from lowbit.passes.instruments import sqnr_db
        logits = self._logits(ir)
        if not torch.isfinite(logits).all():
            return "NaN/Inf in the logits"
        if self.max_ppl is not None:
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), self.win[:, 1:].reshape(-1))
            ppl = math.exp(nll.item())
            if ppl > self.max_ppl:
                return f"perplexity {ppl:.3f} > {self.max_ppl:g}"
        if self.min_sqnr is not None:
            db = sqnr_db(self.ref, logits)
            if db < self.min_sqnr:
                return f"logits SQNR {db:.2f} dB < {self.min_sqnr:g} dB"
        return None


def _run(entries, ir: IR, calib, seed: int, limit: int | None = None) -> tuple[str | None, list[str]]:
    """Run entries on ir (in place): (the pass error, if one was raised; the last entry's applications)."""
    from lowbit.passes import PassContext, PassManager
    from lowbit.passes.pipeline import PipelineError
    pm = PassManager(entries, done=ir.passes_run)
    if limit is not None:
        pm.limits[len(entries) - 1] = limit
    ctx = PassContext(seed=seed, calib=calib, progress=False)
    try:
        pm.run(ir, ctx)
    except PipelineError as e:
        return f"pass error: {e}", list(ctx.applied)
    return None, list(ctx.applied)


def bisect(model, passes: str, *, text, calib=None, max_ppl=None, min_sqnr=None, nan=False, ctx: int = 128,
           max_tokens: int = 2048, seed: int = 0, log=lambda m: None) -> dict:
    """The first pass of `passes` after which the model breaks (the criterion), the first of that
    pass's applications (a linear, a norm, a layer's rotation) that breaks it, and the smallest
    pipeline that still does: that pass restricted to it (`only=`), after those earlier passes it
    still needs. Applications are searched by bisection over how many of them the pass makes, in its
    own order (so it assumes a broken model stays broken as the pass makes more of them)."""
    from lowbit.passes.pipeline import PipelineError, parse_entry, parse_pipeline, print_pipeline
    from lowbit.tools import api
    from lowbit.tools.evaluate import read_text, windows
    entries = parse_pipeline(passes)
    ir0 = api.load(model)
    if ir0.tokenizer is None:
        raise LowbitError(f"{model} carries no tokenizer")
    win = windows(ir0.tokenizer.encode(read_text(text)), ctx, max_tokens)
    calib_win = windows(ir0.tokenizer.encode(read_text(calib)), ctx, 128 * ctx) if calib else None
    crit = Criterion(ir0, win, max_ppl, min_sqnr, nan)
    runs = 0
    first = crit.broken(ir0)
    if first:
        raise LowbitError(f"the model is broken before any pass ({first}): loosen the criterion")
    # 1. pass by pass
    cur, failing = snapshot(ir0), None
    for i, e in enumerate(entries):
        before = snapshot(cur)
        why, applied = _run([e], cur, calib_win, seed)
        runs += 1
        why = why or crit.broken(cur)
        log(f"after {e.text()}: {why or 'ok'}")
        if why:
            failing = (i, e, before, why, applied)
            break
    if failing is None:
        return {"found": False, "pipeline": passes, "runs": runs, "windows": list(win.shape)}
    i, e, before, why, applied = failing
    # 2. within the pass: the least number of its applications that breaks the model
    lo, hi, culprit = 1, len(applied), None
    while lo < hi:
        mid = (lo + hi) // 2
        trial = snapshot(before)
        err, _ = _run([e], trial, calib_win, seed, limit=mid)
        runs += 1
        broken = err or crit.broken(trial)
        log(f"{e.text()} on its first {mid} of {len(applied)} applications: {broken or 'ok'}")
        lo, hi = (lo, mid) if broken else (mid + 1, hi)
    if applied:
        culprit = applied[lo - 1]
    # 3. the smallest pipeline: that application alone, then without each earlier pass it does not need
    last = parse_entry(_with_only(e, culprit)) if culprit else e
    kept = list(entries[:i])
    for j in reversed(range(len(kept))):
        trial_entries = kept[:j] + kept[j + 1:] + [last]
        try:
            parse_pipeline(print_pipeline(trial_entries))
        except PipelineError:
            continue   # a later pass needs it
        trial = snapshot(ir0)
        err, _ = _run(trial_entries, trial, calib_win, seed)
        runs += 1
        if err or crit.broken(trial):
            kept = kept[:j] + kept[j + 1:]
    smallest = kept + [last]
    trial = snapshot(ir0)
    err, _ = _run(smallest, trial, calib_win, seed)
    runs += 1
    still = err or crit.broken(trial)
    return {"found": True, "pass_index": i + 1, "pass": e.text(), "why": why, "applications": len(applied),
            "culprit": culprit, "culprit_index": lo if applied else None, "smallest_pipeline": print_pipeline(smallest),
            "smallest_shows_it": still, "runs": runs, "windows": list(win.shape), "pipeline": passes}


def _with_only(entry, unit: str) -> str:
    """The entry's text restricted to one application (its name escaped for fnmatch)."""
    import re
    pattern = re.sub(r"([*?\[])", r"[\1]", unit)
    opts = [f"{k}={format_value_of(entry, k)}" for k in entry.given if k != "only"] + [f"only={pattern}"]
    return f"{entry.pass_cls.name}{{{','.join(opts)}}}"


def format_value_of(entry, key: str) -> str:
    from lowbit.passes.base import format_value
    return format_value(getattr(entry.config, key))


def bisect_markdown(rep: dict) -> str:
    if not rep["found"]:
        return (f"no pass breaks the model under this criterion ({rep['runs']} runs on {rep['windows'][0]} windows x "
                f"{rep['windows'][1]} tokens)\n")
    lines = [f"first failing pass: #{rep['pass_index']} {rep['pass']} ({rep['why']})"]
    if rep["culprit"]:
        lines.append(f"first failing application: {rep['culprit']} ({rep['culprit_index']} of {rep['applications']})")
    lines.append(f"smallest pipeline: {rep['smallest_pipeline']}" +
                 ("" if rep["smallest_shows_it"] else "  (note: it did not show the problem alone)"))
    lines.append(f"{rep['runs']} pipeline runs on {rep['windows'][0]} windows x {rep['windows'][1]} tokens")
    return "\n".join(lines) + "\n"


# -- precision ------------------------------------------------------------------------------------------
def precision(model, *, recipe=None, passes=None, text, calib=None, high: str | None = None, target_ppl=None,
              max_bpw=None, samples: int = 16, ctx: int = 512, max_tokens: int = 32768, seed: int = 0,
              log=lambda m: None) -> dict:
    """Which linears the recipe's weight quantizer (its last quantize-weights entry, "low") should
    leave to a higher-precision entry ("high": the same options with `high` over them, default one
    more bit) to reach a perplexity (`target_ppl`: the fewest) or a size (`max_bpw`: the most that
    fit). Linears are ranked by measured sensitivity per extra byte (passes/sensitivity.py:
    rank_for_precision, what quantize-weights{promote=...} uses). Each candidate pipeline is
    compiled and its perplexity measured on `text`."""
    from lowbit.passes import PassContext
    from lowbit.passes.pipeline import parse_entry, parse_pipeline, print_pipeline
    from lowbit.passes.quantize_weights import QuantizeWeights
    from lowbit.passes.sensitivity import rank_for_precision, within
    from lowbit.tools import api
    from lowbit.tools.evaluate import perplexity, read_text, windows
    if target_ppl is None and max_bpw is None:
        raise LowbitError("give a target: --target-ppl X or --max-bpw B")
    if calib is None:
        raise LowbitError("precision needs calibration text (--calib FILE) for the sensitivities")
    text_pipeline, _ = api.pipeline_text(recipe, passes)
    entries = parse_pipeline(text_pipeline)
    at = max((i for i, e in enumerate(entries) if e.pass_cls is QuantizeWeights), default=None)
    if at is None:
        raise LowbitError(f"'{text_pipeline}' has no quantize-weights entry to mix precisions in")
    low = entries[at]
    opts = {k: format_value_of(low, k) for k in low.given if k != "only"}
    opts.setdefault("bits", str(low.config.bits + 1))
    if high is None:
        opts["bits"] = str(low.config.bits + 1)
    for item in (high.split(",") if high else []):
        k, _, v = item.partition("=")
        opts[k.strip()] = v.strip()
    high_entry = parse_entry("quantize-weights{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}")
    ir0 = api.load(model)
    win = windows(ir0.tokenizer.encode(read_text(text)), min(ctx, ir0.info.max_ctx), max_tokens)
    calib_win = windows(ir0.tokenizer.encode(read_text(calib)), min(ctx, ir0.info.max_ctx), 128 * ctx)
    base = snapshot(ir0)
    err, _ = _run(entries[:at], base, calib_win, seed) if at else (None, [])
    if err:
        raise LowbitError(err)
    s = base.linears
    todo = [lin for lin in s.linears.values() if not lin.quantized and (low.config.lm_head or lin is not s.lm_head)]
    ranked = rank_for_precision(base, PassContext(seed=seed, calib=calib_win, progress=True), todo,
                                low.config.scheme(), high_entry.config.scheme(), samples)
    for r in ranked:
        r["linear"] = r["linear"].path
    n_w = sum(r["weights"] for r in ranked)

    def bpw(k):
        return 8 * (sum(r["high_bytes"] for r in ranked[:k]) + sum(r["low_bytes"] for r in ranked[k:])) / n_w

    def pipeline(k):
        chosen = "|".join(r["linear"] for r in ranked[:k])
        mixed = ([parse_entry(high_entry.text()[:-1] + f",only={chosen}}}")] if k else []) + [low]
        return entries[:at] + mixed + entries[at + 1:]
    tried = {}

    def measure(k):
        if k not in tried:
            ir = snapshot(base)
            err, _ = _run(pipeline(k)[at:], ir, calib_win, seed)
            if err:
                raise LowbitError(err)
            from lowbit.backends.reference import ReferenceBackend
            ppl = perplexity(ReferenceBackend(ir).logits, win, progress=False)["ppl"]
            tried[k] = {"promoted": k, "bits_per_weight": round(bpw(k), 4), "ppl": ppl}
            log(f"{k} of {len(ranked)} linears at high precision: {bpw(k):.3f} bits/weight, ppl {ppl:.3f}")
        return tried[k]["ppl"]
    if max_bpw is not None:
        k = within(ranked, max_bpw)
        if k is None:
            raise LowbitError(f"the low precision alone takes {bpw(0):.3f} bits/weight, more than {max_bpw:g}")
        measure(0)
        measure(k)
    else:
        lo, hi = 0, len(ranked)
        if measure(hi) > target_ppl:
            k = hi
        else:
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if measure(mid) <= target_ppl else (mid + 1, hi)
            k = lo
            measure(k)
    return {"recipe": recipe or text_pipeline, "low": low.text(), "high": high_entry.text(), "target_ppl": target_ppl,
            "max_bpw": max_bpw, "promoted": [r["linear"] for r in ranked[:k]], "pipeline": print_pipeline(pipeline(k)),
            "bits_per_weight": round(bpw(k), 4), "ppl": tried[k]["ppl"], "reached": target_ppl is None or tried[k]["ppl"] <= target_ppl,
            "tried": sorted(tried.values(), key=lambda r: r["promoted"]), "ranking": ranked,
            "windows": list(win.shape), "sensitivity_samples": samples}


def precision_markdown(rep: dict) -> str:
    goal = f"ppl <= {rep['target_ppl']:g}" if rep["target_ppl"] is not None else f"<= {rep['max_bpw']:g} bits/weight"
    lines = [f"recipe {rep['recipe']}: low {rep['low']}, high {rep['high']}; goal {goal}"
             + ("" if rep["reached"] else " (not reached: every linear at high precision)"), "",
             "| linears at high precision | bits/weight | ppl |", "|---|---|---|"]
    lines += [f"| {r['promoted']} | {r['bits_per_weight']:.3f} | {r['ppl']:.3f} |" for r in rep["tried"]]
    lines += ["", f"chosen: {len(rep['promoted'])} linears, {rep['bits_per_weight']:.3f} bits/weight, ppl {rep['ppl']:.3f}",
              f"pipeline: {rep['pipeline']}"]
    return "\n".join(lines) + "\n"


# -- reproducers ----------------------------------------------------------------------------------------
def repro(directory) -> dict:
    """Rerun the pass a reproducer recorded (passes/instruments.py: Reproducer) on the IR it had,
    with its seed, calibration windows and numeric-diff inputs: whether it fails again, and how."""
    from safetensors.torch import load_file

    from lowbit.ir.artifact import load_artifact
    from lowbit.passes import PassContext, PassManager
    from lowbit.passes.instruments import NumericDiff
    from lowbit.passes.pipeline import PipelineError
    d = Path(directory)
    try:
        spec = json.loads((d / "repro.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LowbitError(f"{d}: not a lowbit reproducer ({e})") from None
    ir = load_artifact(d / "before")
    tensors = load_file(str(d / "inputs.safetensors")) if (d / "inputs.safetensors").exists() else {}
    instruments = [NumericDiff(tensors["diff_inputs"])] if spec.get("diff") else []
    pm = PassManager(spec["pass"], instruments, done=ir.passes_run)
    try:
        pm.run(ir, PassContext(seed=spec["seed"], calib=tensors.get("calib"), progress=True))
    except PipelineError as e:
        return {"reproduced": True, "pass": spec["pass"], "error": str(e), "recorded": spec["error"]}
    return {"reproduced": False, "pass": spec["pass"], "recorded": spec["error"]}
