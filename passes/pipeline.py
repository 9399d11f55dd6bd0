"""Pipelines as text and the pass manager.

Grammar: `entry(,entry)*`, entry = `name` or `name{key=value,...}`; values are ints, floats,
`true`/`false` or bare words. An entry prints back with the options it was given, in the order
given, so parse -> print is the identity on canonical text; the full config (defaults included)
goes into the artifact's manifest. Every pass takes the option `only=PATTERNS` (fnmatch patterns
joined by '|', such as `layers.3.*|lm_head`): it then makes only the applications (linears,
norms, layers' rotations) whose names match, leaving the rest to later entries."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from lowbit.ir.errors import LowbitError
from lowbit.ir import meta
from lowbit.ir.store import Checkpoint

from .base import (REGISTRY, Pass, PassContext, PassFailure, PassResult, config_fields, format_value, parse_value,
                   ranks)


class PipelineError(LowbitError):
    pass


@dataclass(frozen=True)
class Entry:
    pass_cls: type[Pass]
    config: object
    given: tuple[str, ...]   # option keys written in the text, in order
    only: str | None = None  # the applications it makes (PassContext.applies): None, all

    def text(self) -> str:
        opts = [f"{k}={format_value(self.only if k == 'only' else getattr(self.config, k))}" for k in self.given]
        return f"{self.pass_cls.name}{{{','.join(opts)}}}" if opts else self.pass_cls.name

    def make(self) -> Pass:
        return self.pass_cls(self.config)


_ENTRY = re.compile(r"^([a-z][a-z0-9-]*)(?:\{(.*)\})?$", re.S)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            raise PipelineError(f"unbalanced '}}' in pipeline: {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PipelineError(f"unbalanced '{{' in pipeline: {text!r}")
    return parts + [cur]


def parse_entry(text: str) -> Entry:
    m = _ENTRY.match(text.strip())
    if not m:
        raise PipelineError(f"cannot parse pipeline entry {text.strip()!r}: expected name or name{{key=value,...}}")
    name, body = m.group(1), m.group(2)
    if name not in REGISTRY:
        raise PipelineError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    cls = REGISTRY[name]
    fields = config_fields(cls)
    values, given, only = {}, [], None
    for item in (body.split(",") if body and body.strip() else []):
        key, eq, raw = item.strip().partition("=")
        if eq and key == "only" and "only" not in fields:
            if only is not None:
                raise PipelineError(f"{name}: option 'only' given twice")
            if not raw.strip():
                raise PipelineError(f"{name}: only= needs names or patterns (such as layers.3.*|lm_head)")
            only = raw.strip()
            given.append(key)
            continue
        if not eq or key not in fields:
            raise PipelineError(f"{name}: no option '{key}' (options: {', '.join([*fields, 'only'])})")
        if key in values:
            raise PipelineError(f"{name}: option '{key}' given twice")
        try:
            values[key] = parse_value(raw.strip(), fields[key])
        except ValueError as e:
            raise PipelineError(f"{name}: option {key}={raw.strip()}: {e}") from None
        given.append(key)
    try:
        config = cls.Config(**values)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"{name}: {e}") from None
    return Entry(cls, config, tuple(given), only)


def parse_pipeline(text: str, done=()) -> list[Entry]:
    """Entries of a pipeline text, their order checked against what each pass declares (`done`:
    the entries, or their texts, already run on the model it will run on)."""
    if not text.strip():
        raise PipelineError("empty pipeline")
    entries = [parse_entry(p) for p in _split_top(text)]
    check_order(entries, done)
    return entries


def check_order(entries: list[Entry], done=()):
    """Each pass's declared needs (Pass.needs) and order (Pass.after) hold, or PipelineError."""
    done = [parse_entry(d) if isinstance(d, str) else d for d in done]
    for i, e in enumerate(entries):
        cls = e.pass_cls
        for need in cls.needs:
            if not need.applies(e.config):
                continue
            pool = done + entries[:i] if need.before else entries[i + 1:]
            if not any(need.met_by(o.pass_cls.name, o.config) for o in pool):
                raise PipelineError(f"'{e.text()}' {need}")
        for later in entries[i + 1:]:
            if later.pass_cls.name in cls.after:
                raise PipelineError(f"'{later.text()}' must come before '{e.text()}'")
        for earlier in done:
            if cls.name in earlier.pass_cls.after:
                raise PipelineError(f"'{e.text()}' must come before '{earlier.text()}', which already ran on this model")


def print_pipeline(entries: list[Entry]) -> str:
    return ",".join(e.text() for e in entries)


class Instrument:
    """Hooks around each pass. The manager calls none of them when no instrument is on."""

    def start(self, ir, ctx):
        pass

    def before(self, index: int, entry: Entry, p: Pass, ir, ctx):
        pass

    def after(self, index: int, entry: Entry, p: Pass, ir, ctx, result: PassResult):
        pass

    def failed(self, index: int, entry: Entry, p: Pass, ir, ctx, error: Exception):
        """The pass raised (or an instrument's `after` did, such as a broken contract)."""


class PassManager:
    def __init__(self, entries: list[Entry] | str, instruments=(), done=()):
        """done: the entries (or texts) already run on the model the pipeline will run on."""
        self.entries = parse_pipeline(entries, done) if isinstance(entries, str) else list(entries)
        if not isinstance(entries, str):
            check_order(self.entries, done)
        self.instruments = list(instruments)
        self.limits: dict[int, int] = {}   # entry index -> its first applications only (debug bisect)

    def __str__(self):
        return print_pipeline(self.entries)

    def run(self, ir, ctx: PassContext | None = None) -> list[PassResult]:
        ctx = ctx or PassContext()
        results = []
        for inst in self.instruments:
            inst.start(ir, ctx)
        for i, entry in enumerate(self.entries):
            p = entry.make()
            ctx.later = {cls: [e for e in self.entries[i + 1:] if e.pass_cls is cls] for cls in p.reads_later}
            ctx.checkpoint = Checkpoint(ctx.resume / f"{i + 1:02d}-{entry.pass_cls.name}", write=ranks()[0] == 0) \
                if ctx.resume else None
            ctx.only, ctx.limit, ctx.applied = entry.only, self.limits.get(i), []
            try:
                for inst in self.instruments:
                    inst.before(i, entry, p, ir, ctx)
                res = p.run(ir, ctx)
                if not isinstance(res, PassResult) or type(res.modified) is not bool:
                    raise PassFailure(f"returned {res!r}, not a PassResult with a bool 'modified'")
                ir.passes_run.append(entry.text())
                ir.stats.append({"pass": entry.text(), "config": dataclasses.asdict(entry.config),
                                 "contract": str(p.contract()), "modified": res.modified, **res.stats})
                if entry.only is not None or i in self.limits:
                    ir.stats[-1]["applied"] = list(ctx.applied)
                for inst in self.instruments:
                    inst.after(i, entry, p, ir, ctx, res)
            except Exception as e:
                err = self._error(i, entry, e if isinstance(e, LowbitError) else f"{type(e).__name__}: {e}",
                                  getattr(e, "node", None) if isinstance(e, LowbitError) else None)
                for inst in self.instruments:
                    inst.failed(i, entry, p, ir, ctx, err)
                raise err from e
            results.append(res)
        return results

    def _error(self, i, entry, e, node) -> PipelineError:
        before = ", ".join(x.text() for x in self.entries[:i]) or "none"
        where = ""
        if isinstance(node, str):   # StructureError carries the node's name
            where = f" at node '{node}'"
        elif node is not None:
            where = f" at node '{node.name}' (handle {node.meta.get(meta.HANDLE, '?')})"
        return PipelineError(f"pass '{entry.text()}' (#{i + 1}){where} failed: {e}; passes run before: {before}")
