"""`lowbit report ART --html FILE`: one self-contained HTML page about an artifact, plots as inline
SVG (matplotlib): per-linear weight SQNR and bits per weight, per-pass statistics and timings,
outliers and input (Hessian) statistics where the passes recorded them, and, given a `bench
quality` directory, perplexity against bits per weight for every row with its Pareto front."""
from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

from lowbit.ir import meta
from lowbit.ir.graph import short_name

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _svg(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)   # creator and date: not needed inline
    return text[text.index("<svg"):]   # drop the XML prologue: inline in the page


def _figure(width=9.0, height=3.2):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "svg.fonttype": "none"})
    return plt.subplots(figsize=(width, height))


def _role(name: str) -> str:
    return next((r for r in ROLES if name.endswith(r)), "other")


def _per_linear(title: str, ylabel: str, values: dict[str, float], log_scale: bool = False) -> str:
    """A bar per linear in graph order, colored by its role (q, k, v, o, gate, up, down, other)."""
    fig, ax = _figure()
    names = list(values)
    colors = {r: f"C{i}" for i, r in enumerate(ROLES + ("other",))}
    ax.bar(range(len(names)), [values[n] for n in names], color=[colors[_role(n)] for n in names], width=0.85)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("linear (graph order)")
    ax.set_xlim(-1, len(names))
    used = [r for r in ROLES + ("other",) if any(_role(n) == r for n in names)]
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=colors[r], label=r) for r in used],
              ncol=len(used), fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False)
    return _svg(fig)


def _pass_times(passes: list[dict]) -> str:
    fig, ax = _figure(9.0, 0.5 + 0.35 * len(passes))
    names = [p["pass"] if len(p["pass"]) < 60 else p["pass"][:57] + "..." for p in passes]
    ax.barh(range(len(passes)), [p.get("seconds", 0) for p in passes], color="C0")
    ax.set_yticks(range(len(passes)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("time per pass")
    return _svg(fig)


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both bits per weight and perplexity (lower is better)."""
    pts = [r for r in rows if r.get("ppl") is not None and r.get("bits_per_weight") is not None and r["kind"] != "fp"]
    return sorted((r for r in pts if not any(o["bits_per_weight"] <= r["bits_per_weight"] and o["ppl"] <= r["ppl"]
                                             and (o["bits_per_weight"], o["ppl"]) != (r["bits_per_weight"], r["ppl"])
                                             for o in pts)), key=lambda r: r["bits_per_weight"])


def _quality_plot(report: dict) -> str:
    rows = [r for r in report["rows"] if r.get("ppl") is not None and r.get("bits_per_weight") is not None
            and r["kind"] != "fp"]
    fig, ax = _figure(9.0, 4.5)
    for kind, color, marker in (("lowbit", "C0", "o"), ("peer", "C3", "s")):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["bits_per_weight"] for r in sel], [r["ppl"] for r in sel], c=color, marker=marker, label=kind, zorder=3)
        for r in sel:
            ax.annotate(r["name"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto(report["rows"])
    ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], "k--", lw=1, label="Pareto front", zorder=2)
    fp = next((r for r in report["rows"] if r["kind"] == "fp" and r.get("ppl")), None)
    if fp:
        ax.axhline(fp["ppl"], color="gray", lw=1, ls=":", label=f"fp32 {fp['ppl']:.2f}")
    ax.set_xlabel("bits per weight (quantized linears, as each tool stores them)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(report['text']).name}: perplexity against size")
    ax.legend(fontsize=8)
    return _svg(fig)


def _table(header: list[str] | None, rows: list[list]) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def build(artifact, bench: str | None = None) -> str:
    """The report page of an artifact (and of a bench quality directory), as HTML text."""
    from lowbit.tools.report import inspect_artifact
    rep = inspect_artifact(artifact)
    st, passes, man = rep["storage"], rep["passes"], rep["manifest"]
    sections = []
    size = f"{st['total_bytes'] / 2**20:.2f} MiB"
    facts = [["model", f"{rep['model'].get('source')} ({rep['model'].get('family')})"], ["pipeline", rep["pipeline"]],
             ["bits per weight (quantized linears)", st["bits_per_weight"]], ["size", size],
             ["quantized linears", st["quantized_linears"]],
             ["compile", f"{man.get('compile_seconds')} s, peak {man.get('peak_rss_mb')} MB"],
             ["lowbit", man.get("lowbit_version")], ["created", man.get("created")]]
    sections.append(("Artifact", _table(None, facts)))
    rows = []
    for p in passes:
        stats = ", ".join(f"{k}={v}" for k, v in p.items()
                          if k not in ("pass", "config", "contract", "seconds", "modified") and _scalar(v))
        rows.append([p["pass"], p.get("contract", ""), p.get("modified", ""), p.get("seconds", ""), stats])
    sections.append(("Passes", _table(["pass", "contract", "modified", "seconds", "statistics"], rows)
                     + (_pass_times(passes) if any("seconds" in p for p in passes) else "")))
    sqnr = {}
    hess = {}
    for p in passes:
        sqnr.update({short_name(k): v for k, v in (p.get("weight_sqnr_db") or {}).items()})
        hess.update(p.get("hessian") or {})
    if sqnr:
        sections.append(("Weight SQNR per linear",
                         _per_linear("weight SQNR (quantized against float, dB)", "dB", sqnr)))
    if st["linears"]:
        bpw = {short_name(r["module"]): r["bits_per_weight"] for r in st["linears"]}
        sections.append(("Bits per weight per linear", _per_linear("bits per weight as stored (codes, scales, zero points, "
                                                                   "tables, outliers)", "bits", bpw)))
    outliers = _outliers(artifact)
    if outliers:
        sections.append(("Outliers per linear", _per_linear("values kept apart in fp16 (dense-and-sparse)", "count",
                                                            outliers)))
    if hess:
        sections.append(("Input statistics per linear (GPTQ Hessians)",
                         _per_linear("largest over mean input energy (diagonal of H): outlier input channels",
                                     "max / mean", {k: v["max_over_mean"] for k, v in hess.items()}, log_scale=True)))
    if bench:
        q = json.loads((Path(bench) / "quality.json").read_text())
        rows = [[r["name"], r["kind"], "skipped" if r.get("ppl") is None else f"{r['ppl']:.3f}",
                 "" if r.get("bits_per_weight") is None else f"{r['bits_per_weight']:.3f}",
                 "yes" if r in pareto(q["rows"]) else "", r.get("skipped", "")] for r in q["rows"]]
        sections.append(("Quality against size (bench quality)", _quality_plot(q) +
                         _table(["row", "kind", "ppl", "bits/weight", "on the Pareto front", "note"], rows)))
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{c}</section>" for t, c in sections)
    title = f"lowbit report: {Path(artifact).name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}svg{max-width:100%;height:auto}"
            f"</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def _outliers(artifact) -> dict[str, int]:
    nodes = json.loads((Path(artifact) / "graph.json").read_text())
    return {short_name(n["meta"].get(meta.MODULE, n["name"])): n["meta"][meta.SPARSE]["nnz"]
            for n in nodes if meta.SPARSE in n["meta"]}


def write(artifact, out, bench: str | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(build(artifact, bench))
    tmp.replace(out)
    return out
