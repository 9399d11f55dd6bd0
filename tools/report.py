"""Sizes and bits per weight, computed from what an artifact actually stores."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from lowbit.ir import meta
from lowbit.ir.artifact import read_manifest, weight_files
from lowbit.ir.graph import short_name
from lowbit.ir.store import SAFETENSORS_DTYPES



def storage(ir) -> dict:
    """Bits per weight of the quantized linears (codes + scales + zero points) and model size, from
    the live IR's tensors and graph."""
    sizes = {name: ir.placeholder(name).numel() * ir.placeholder(name).element_size() for name in ir.tensor_targets()}
    return _summarize(sizes, _quantized(_graph_rows(ir.graph)))


def artifact_storage(path) -> dict:
    path = Path(path)
    sizes = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                sizes[k] = n * SAFETENSORS_DTYPES[sl.get_dtype()].itemsize
    nodes = json.loads((path / "graph.json").read_text())
    return _summarize(sizes, _quantized(nodes))


def _graph_rows(g):
    return [{"name": n.name, "meta": n.meta} for n in g.nodes]


def _quantized(rows) -> list[dict]:
    """One entry per quantized linear: its module, shape, how it is stored and the tensors holding
    it (codes, scales, zero points or lookup table, and sparse outliers if split)."""
    out = []
    for r in rows:
        q = r["meta"].get(meta.QUANT)
        if not q:
            continue
        sparse = r["meta"].get(meta.SPARSE, {})
        out.append({"module": r["meta"].get(meta.MODULE, r["name"]), **q,
                    "tensors": q["tensors"] + sparse.get("tensors", []), "nnz": sparse.get("nnz", 0)})
    return out


def _summarize(sizes: dict[str, int], quant: list[dict]) -> dict:
    q_tensors = {t for q in quant for t in q["tensors"]}
    rows = []
    n_w = q_bytes = 0
    for q in quant:
        b = sum(sizes[t] for t in q["tensors"])
        w = q["shape"][0] * q["shape"][1]
        n_w += w
        q_bytes += b
        rows.append({"module": q["module"], "shape": q["shape"], "method": q["method"], "bits": q["bits"],
                     "group": q["group"], "sym": q["sym"], "lut": q.get("lut", 0), "sparse": q["nnz"],
                     "bits_per_weight": round(8 * b / w, 4)})
    other = sum(v for k, v in sizes.items() if k not in q_tensors)
    return {"quantized_linears": len(rows), "quantized_weights": n_w,
            "bits_per_weight": round(8 * q_bytes / n_w, 4) if n_w else None,
            "quantized_bytes": q_bytes, "other_bytes": other, "total_bytes": q_bytes + other, "linears": rows}


def rotations(path) -> dict[str, list[str]]:
    """Which rotations each linear received, by module path (fuse-rotations / insert-hadamard)."""
    nodes = json.loads((Path(path) / "graph.json").read_text())
    return {short_name(n["meta"].get(meta.MODULE, n["name"])): n["meta"][meta.ROTATIONS]
            for n in nodes if meta.ROTATIONS in n["meta"]}


def inspect_artifact(path) -> dict:
    man = read_manifest(path)
    return {"artifact": str(path), "model": man.get("model", {}), "pipeline": man.get("pipeline"),
            "passes": man.get("passes", []), "storage": artifact_storage(path), "rotations": rotations(path),
            "manifest": {k: v for k, v in man.items() if k not in ("passes", "model", "pipeline_entries")}}


def format_inspect(rep: dict) -> str:
    st = rep["storage"]
    lines = [f"artifact  {rep['artifact']}",
             f"model     {rep['model'].get('source')} ({rep['model'].get('family')})",
             f"pipeline  {rep['pipeline']}", "", "passes:"]
    for p in rep["passes"]:
        keep = {k: v for k, v in p.items() if k not in ("pass", "config", "weight_sqnr_db", "contract", "groups", "hessian",
                                                         "applied")}
        lines.append(f"  {p['pass']}  [{p.get('contract')}]")
        lines.append("      " + ", ".join(f"{k}={v}" for k, v in keep.items()))
    lines += ["", f"quantized linears: {st['quantized_linears']}  weights: {st['quantized_weights']:,}  "
                  f"bits/weight (codes, scales, zeros, tables, sparse): {st['bits_per_weight']}",
              f"size: {st['total_bytes'] / 2**20:.2f} MiB ({st['quantized_bytes'] / 2**20:.2f} MiB quantized, "
              f"{st['other_bytes'] / 2**20:.2f} MiB other tensors)"]
    if rep["rotations"]:
        lines += ["", "rotations:"]
        lines += [f"  {mod:<44} {', '.join(rs)}" for mod, rs in rep["rotations"].items()]
    if st["linears"]:
        lines.append("")
        lines.append(f"  {'linear':<44} {'shape':>12} {'method':>10} {'bits':>4} {'group':>5} {'sym':>5} "
                     f"{'lut':>4} {'sparse':>6} {'bpw':>7}")
        for r in st["linears"]:
            shape = "x".join(map(str, r["shape"]))
            lines.append(f"  {short_name(r['module']):<44} {shape:>12} {r['method']:>10} {r['bits']:>4} {r['group']:>5} "
                         f"{str(r['sym']).lower():>5} {r['lut'] or '-':>4} {r['sparse'] or '-':>6} "
                         f"{r['bits_per_weight']:>7}")
    return "\n".join(lines)
