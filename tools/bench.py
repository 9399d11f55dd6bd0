"""`lowbit bench quality`: perplexity, delta vs FP and bits per weight for FP, lowbit's recipes and
peer quantizers, on one model, one calibration text and one evaluation protocol, in one process.

Each row's result is kept in OUT/rows/NAME.json under a key of everything it depends on (row
definition, model, texts, protocol, versions), so an interrupted run resumes where it stopped."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from lowbit.ir.errors import LowbitError

DEFAULT_RECIPES = ("w4-rtn", "w4-gptq", "quarot-w4-gptq", "finequant-w4", "squeezellm-w3-sparse",
                   "quarot-w3-sparse-gptq", "squeezellm-w4")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bench_quality(model: str, text: str, calib: str, recipes, peers, out: Path, ctx: int = 512,
                  max_tokens: int = 32768, gguf: bool = False, log=print) -> dict:
    """gguf: also a row per recipe for its GGUF export run in llama.cpp (on lowbit's tokens),
    skipped with the reason where the recipe's weights are not on a GGUF grid."""
    from lowbit.ir.load import sha256_files
    from lowbit.passes import RECIPES
    from lowbit.tools import peers as peer_mod
    from lowbit.ir.load import package_version as _version
    from lowbit.tools import api
    from lowbit.tools.report import artifact_storage

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise LowbitError(f"unknown recipe(s) {', '.join(unknown)} (known: {', '.join(RECIPES)})")
    unknown = [p for p in peers if p not in peer_mod.PEERS]
    if unknown:
        raise LowbitError(f"unknown peer(s) {', '.join(unknown)} (known: {', '.join(peer_mod.PEERS)})")
    out = Path(out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    ir_fp = api.load(model)
    base = {"model": ir_fp.info.source_hash, "text": sha256_files([text]), "calib": sha256_files([calib]),
            "ctx": ctx, "max_tokens": max_tokens, "lowbit": _version("lowbit"), "torch": _version("torch")}
    rows = []

    def row(name: str, kind: str, what: str, run, spec):
        f = out / "rows" / f"{name}.json"
        key = _key({**base, "row": spec})
        if f.is_file():
            old = json.loads(f.read_text())
            if old.get("key") == key:
                log(f"{name}: kept from an earlier run ({f})")
                rows.append(old)
                return
        log(f"{name}: {what}")
        t = time.perf_counter()
        try:
            res = run()
        except peer_mod.PeerUnavailable as e:
            res = {"ppl": None, "bits_per_weight": None, "skipped": str(e)}
            log(f"{name}: skipped ({e})")
        r = {"name": name, "kind": kind, "what": what, **res, "seconds": round(time.perf_counter() - t, 1), "key": key}
        f.write_text(json.dumps(r, indent=1))
        rows.append(r)

    def fp(ir=ir_fp):
        return {"ppl": api.evaluate(ir, text, ctx=ctx, max_tokens=max_tokens)["ppl"], "bits_per_weight": 32.0,
                "versions": {"torch": _version("torch"), "transformers": _version("transformers")}}
    row("fp32", "fp", "the model as loaded, float32, torch reference backend", fp, "fp32")
    del fp, ir_fp

    for name in recipes:
        pipeline, doc = RECIPES[name]

        def run(name=name, pipeline=pipeline):
            art = out / "artifacts" / name
            api.compile(model, name, calib=calib, out=art, force=True)
            st = artifact_storage(art)
            return {"ppl": api.evaluate(str(art), text, ctx=ctx, max_tokens=max_tokens)["ppl"],
                    "bits_per_weight": st["bits_per_weight"], "size_mib": round(st["total_bytes"] / 2**20, 1),
                    "pipeline": pipeline, "artifact": str(art), "versions": {"lowbit": _version("lowbit")}}
        row(name, "lowbit", doc, run, pipeline)
        if gguf:
            row(f"{name} (llama.cpp)", "lowbit", f"the {name} artifact exported to GGUF, run in llama.cpp",
                lambda name=name: _gguf_row(out / "artifacts" / name, out / "exports" / f"{name}.gguf", text, ctx,
                                            max_tokens), (pipeline, "gguf"))

    for name in peers:
        peer = peer_mod.PEERS[name]
        row(name, "peer", peer.what, lambda peer=peer: peer.run(model, text, ctx, max_tokens, out, calib), peer.what)

    fp_ppl = rows[0]["ppl"]
    for r in rows:
        r["delta_ppl"] = None if r["ppl"] is None else r["ppl"] - fp_ppl
    report = {"model": model, "text": text, "calib": calib, "ctx": ctx, "max_tokens": max_tokens, "rows": rows}
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.md").write_text(markdown(report))
    return report


def _gguf_row(art: Path, path: Path, text: str, ctx: int, max_tokens: int) -> dict:
    """An artifact's GGUF export in llama.cpp, fed the artifact's own tokens."""
    from lowbit.backends.gguf import linear_bits_per_weight
    from lowbit.ir.load import load_tokenizer, package_version
    from lowbit.tools import api
    from lowbit.tools.deployed import open_gguf
    from lowbit.tools.evaluate import perplexity, read_text, windows
    from lowbit.tools.peers import PeerUnavailable
    try:
        api.export(str(art), path, format="gguf")
        runner = open_gguf(path, art / "tokenizer")
    except LowbitError as e:
        raise PeerUnavailable(str(e).splitlines()[0]) from None
    win = windows(load_tokenizer(art / "tokenizer").encode(read_text(text)), ctx, max_tokens)
    return {"ppl": perplexity(runner.logits, win, progress=False)["ppl"],
            "bits_per_weight": round(linear_bits_per_weight(path), 4), "size_mib": round(path.stat().st_size / 2**20, 1),
            "versions": {"llama-cpp-python": package_version("llama-cpp-python")}}


def markdown(report: dict) -> str:
    lines = [f"Model {report['model']}; text {Path(report['text']).name}, first {report['max_tokens']} tokens in "
             f"windows of {report['ctx']}; calibration {Path(report['calib']).name}.", "",
             "| row | kind | ppl | Δppl | bits/weight | size MiB | what | versions |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ppl = "skipped" if r["ppl"] is None else f"{r['ppl']:.2f}"
        delta = "" if r["ppl"] is None or r["kind"] == "fp" else f"{r['delta_ppl']:+.2f}"
        bpw = "" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        what = r["what"] + (f" ({r['skipped']})" if r.get("skipped") else "")
        versions = ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items())
        size = "" if r.get("size_mib") is None else f"{r['size_mib']:.1f}"
        lines.append(f"| {r['name']} | {r['kind']} | {ppl} | {delta} | {bpw} | {size} | {what} | {versions} |")
    return "\n".join(lines) + "\n"


# -- decode speed -----------------------------------------------------------------------------------
def _llama_cpp(gguf: Path, threads: int):
    """llama.cpp (llama-cpp-python) over a GGUF, behind the same step() as the ONNX rows; None with
    the reason when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install 'lowbit[llamacpp]')"
    import numpy as np

    class LlamaCpp:
        def __init__(self):
            self.llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)

        def empty_past(self, b):
            self.llm.reset()
            return None

        def step(self, input_ids, attention_mask, position_ids, past):
            self.llm.eval(input_ids[0].tolist())
            return np.asarray(self.llm.scores[self.llm.n_tokens - 1])[None, None], None
    return LlamaCpp(), f"llama-cpp-python {llama_cpp.__version__}"


class _Genai:
    """An onnxruntime-genai folder, timed by its own generation loop: prefill (append_tokens), then
    one generate_next_token per new token."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og
        cfg_path = folder / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=2))
        self.og, self.model = og, og.Model(str(folder))

    def timed(self, ids: list[int], n: int) -> tuple[float, float]:
        import time
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        gen = self.og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()   # the prefill's own token
        t1 = time.perf_counter()
        done = 0
        while not gen.is_done() and done < n - 1:
            gen.generate_next_token()
            done += 1
        return len(ids) / (t1 - t0), done / (time.perf_counter() - t1)


def _exported_rows(artifacts, out: Path, threads: int, log) -> tuple[list, dict]:
    """Rows for what each artifact exports to besides the ort decoder: its onnxruntime-genai folder
    and, where its weights are on a GGUF grid, its GGUF in llama.cpp ((name, what, backend, bytes)
    each), and why any was skipped."""
    from lowbit.ir.errors import LowbitError
    from lowbit.tools import api
    rows, skipped = [], {}
    for a in artifacts:
        name = Path(a).name
        folder = out / "exports" / f"{name}-genai"
        try:
            import onnxruntime_genai  # noqa: F401
            api.export(a, folder, format="onnx-genai")
            rows.append((f"{name} (onnxruntime-genai)", "onnxruntime-genai folder, MatMulNBits accuracy_level 4",
                         _Genai(folder, threads), (folder / "model.onnx").stat().st_size))
        except (ImportError, LowbitError) as e:
            skipped[f"{name} (onnxruntime-genai)"] = str(e).splitlines()[0]
        gguf = out / "exports" / f"{name}.gguf"
        try:
            api.export(a, gguf, format="gguf")
            llama, why = _llama_cpp(gguf, threads)
            if llama is None:
                raise LowbitError(why)
            rows.append((f"{name} (llama.cpp)", f"{why}, lowbit's GGUF", llama, gguf.stat().st_size))
        except LowbitError as e:
            skipped[f"{name} (llama.cpp)"] = str(e).splitlines()[0]
    for k, why in skipped.items():
        log(f"skipping {k}: {why}")
    return rows, skipped


def bench_decode(artifacts: list[str], model: str, out: Path, accuracy_levels=(4, 0), prompt_tokens: int = 64,
                 new_tokens: int = 64, repeats: int = 3, threads: int = 2, gguf: str | None = None, log=print) -> dict:
    """Prefill and decode tokens/s of onnxruntime over the float export of `model` and each artifact's
    int4 export (per MatMulNBits accuracy level), of each artifact's onnxruntime-genai folder and
    (where its grid is one) its GGUF in llama.cpp, and of llama.cpp on the model's GGUF, measured
    interleaved in one process (each row's median over `repeats` rounds)."""
    import statistics

    from lowbit.backends.onnx import OrtBackend, cached_export
    from lowbit.tools import api
    from lowbit.ir.load import load_tokenizer
    from lowbit.ir.load import package_version as _version
    from lowbit.tools.defaults import DEFAULT_MODEL, DEMO_TEXT, fetch_default_gguf
    from lowbit.tools.generate import generate

    rows = [("fp32", model, "onnxruntime, float32 export of the source model", cached_export(api.load(model), log=log), 0)]
    for a in artifacts:
        for level in accuracy_levels:
            path = cached_export(a, accuracy_level=level, log=log)
            rows.append((f"{Path(a).name} (ort, acc {level})", a,
                         f"onnxruntime, MatMulNBits accuracy_level {level}", path, level))
    backends = {name: OrtBackend(path, threads=threads) for name, _, _, path, _ in rows}
    sizes = {name: path.stat().st_size for name, _, _, path, _ in rows}
    gguf = Path(gguf) if gguf else (fetch_default_gguf() if model == DEFAULT_MODEL else None)
    notes = {}
    if gguf is not None:
        llama, why = _llama_cpp(gguf, threads)
        if llama is None:
            notes["llama.cpp"] = why
            log(f"skipping llama.cpp: {why}")
        else:
            backends["llama.cpp"] = llama
            rows.append(("llama.cpp", str(gguf), f"{why}, {gguf.name}", gguf, None))
            sizes["llama.cpp"] = gguf.stat().st_size
    extra, skipped = _exported_rows(artifacts, Path(out), threads, log)
    notes.update(skipped)
    for name, what, b, size in extra:
        backends[name], sizes[name] = b, size
        rows.append((name, None, what, None, None))
    tok = load_tokenizer(Path(artifacts[0]) / "tokenizer") if artifacts else None
    ids = (tok.encode(DEMO_TEXT.read_text()) if tok else list(range(1000, 2000)))[:prompt_tokens]
    times = {name: [] for name in backends}
    for r in range(repeats + 1):       # round 0 warms every row up and is not counted
        for name, b in backends.items():
            if hasattr(b, "timed"):   # a runtime with its own generation loop
                speed = b.timed(ids, new_tokens)
            else:
                res = generate(b, ids, new_tokens)
                speed = (res["prefill_tokens"] / res["prefill_s"], res["decode_tokens"] / res["decode_s"])
            if r:
                times[name].append(speed)
        log(f"round {r}/{repeats} done")
    fp = statistics.median(d for _, d in times["fp32"])
    table = []
    for name, spec, what, path, _ in rows:
        pre = statistics.median(p for p, _ in times[name])
        dec = statistics.median(d for _, d in times[name])
        table.append({"row": name, "prefill_tok_s": round(pre, 1), "decode_tok_s": round(dec, 1),
                      "decode_vs_fp32": round(dec / fp, 2), "file_mb": round(sizes[name] / 2**20, 1), "what": what})
    rep = {"model": model, "threads": threads, "prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats,
           "versions": {p: _version(p) for p in ("onnxruntime", "torch", "llama_cpp_python")}, "rows": table,
           "skipped": notes}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "decode.md").write_text(decode_markdown(rep))
    return rep


def decode_markdown(rep: dict) -> str:
    lines = [f"Decode speed: {rep['model']}, batch 1, {rep['prompt_tokens']}-token prompt then {rep['new_tokens']} "
             f"greedy tokens, {rep['threads']} threads, median of {rep['repeats']} interleaved rounds.", "",
             "| row | prefill tok/s | decode tok/s | decode vs fp32 | file MiB | what |", "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        lines.append(f"| {r['row']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {r['decode_vs_fp32']}x | "
                     f"{r['file_mb']} | {r['what']} |")
    for k, v in rep["skipped"].items():
        lines.append(f"\n{k} skipped: {v}")
    return "\n".join(lines) + "\n"


# -- CUDA kernels (a GPU machine) -------------------------------------------------------------------
PEAK_GBS = {"H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800, "A100-SXM4-80GB": 2039,
            "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935}


def _graph_time(calls, repeats: int) -> float:
    """Microseconds per call: the calls (each on its own input set) captured once in a CUDA graph,
    enough times over to fill ~200 launches, replayed `repeats` times between CUDA events; median."""
    import statistics

    import torch
    for c in calls:        # warm-up outside the graph: library load, caches, attributes
        c()
    torch.cuda.synchronize()
    inner = max(1, 200 // len(calls))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            for c in calls:
                c()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (inner * len(calls)))
    del g
    return statistics.median(ts)


def bench_kernels(shapes=((4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)),
                  batches=(1, 4, 16), repeats: int = 20, density: float = 0.0045, log=print) -> dict:
    """Each plugin kernel against cuBLAS fp16 (torch.matmul) on the same shapes, timed side by side.
    Every kernel runs from a CUDA graph over several copies of its weights (together over 4x the L2
    cache, so the numbers are HBM's, not the cache's); bandwidth is the bytes each kernel must read
    (weights, scales, tables, activations) over its time, as a fraction of the device's datasheet
    peak and of a measured device-to-device copy."""
    import math

    import torch

    from lowbit.plugins import torch_ops
    if not torch.cuda.is_available():
        raise LowbitError("bench kernels needs a CUDA GPU")
    torch_ops.register()
    dev = "cuda"
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBS.items() if k in name), None)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    src, dst = (torch.empty(2**29, dtype=torch.uint8, device=dev) for _ in range(2))   # 512 MiB, read + write
    copy_gbs = 2 * src.numel() / _graph_time([lambda: dst.copy_(src)], repeats) / 1e3
    log(f"{name}: L2 {l2 / 2**20:.0f} MiB, datasheet {peak} GB/s, device-to-device copy {copy_gbs:.0f} GB/s")

    def copies(nbytes: int) -> int:
        return max(2, math.ceil(4 * l2 / nbytes))

    def gbs(nbytes, us):
        return nbytes / us / 1e3

    rows = []
    g = torch.Generator(dev).manual_seed(0)

    def rand_bytes(*shape):   # random packed codes: uniform bytes are uniform codes
        return torch.randint(0, 256, shape, generator=g, device=dev, dtype=torch.uint8)

    def outliers(n, k):
        r, c = (torch.rand(n, k, generator=g, device=dev) < density).nonzero(as_tuple=True)
        crow = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=n), 0)
        return crow, c.int(), torch.randn(len(c), generator=g, device=dev, dtype=torch.float16)

    for k, n in shapes:
        w16 = [torch.randn(n, k, generator=g, device=dev, dtype=torch.float16) * 0.02 for _ in range(copies(2 * n * k))]
        c4, c3 = copies(n * k // 2), copies(n * k * 3 // 8)
        w4 = [(rand_bytes(n, k // 128, 64), torch.rand(n * (k // 128), generator=g, device=dev, dtype=torch.float16) * 0.01)
              for _ in range(c4)]
        w3 = [(rand_bytes(n, k * 3 // 8), torch.randn(n, 8, generator=g, device=dev, dtype=torch.float16))
              for _ in range(c3)]
        csr = [outliers(n, k) for _ in range(max(c4, c3))]
        bytes4 = n * k // 2 + 2 * n * (k // 128)
        bytes3 = n * ((k * 3 + 7) // 8) + 2 * n * 8
        for m in batches:
            xs = [torch.randn(m, k, generator=g, device=dev, dtype=torch.float16) for _ in range(max(len(w16), c4, c3))]
            t16 = _graph_time([lambda i=i: torch.matmul(xs[i], w16[i].T) for i in range(len(w16))], repeats)
            t4 = _graph_time([lambda i=i: torch_ops.matmul_nbits(xs[i], *w4[i], None, None, k, n, 4, 128)
                              for i in range(c4)], repeats)
            row = {"K": k, "N": n, "batch": m, "cublas_fp16_us": round(t16, 2), "int4_us": round(t4, 2),
                   "int4_speedup": round(t16 / t4, 2), "int4_gbs": round(gbs(bytes4 + 2 * m * k, t4)),
                   "fp16_gbs": round(gbs(2 * n * k + 2 * m * k, t16))}
            if peak:
                row["int4_bw_frac"] = round(row["int4_gbs"] / peak, 3)
            row["int4_bw_vs_copy"] = round(row["int4_gbs"] / copy_gbs, 3)
            if m <= 8:
                t3 = _graph_time([lambda i=i: torch_ops.lut_matmul(xs[i], *w3[i], 3, k) for i in range(c3)], repeats)
                t3s = _graph_time([lambda i=i: torch_ops.lut_matmul(xs[i], *w3[i], 3, k, csr[i]) for i in range(c3)],
                                  repeats)
                t4s = _graph_time([lambda i=i: torch_ops.matmul_nbits(xs[i], *w4[i], None, None, k, n, 4, 128, csr[i])
                                   for i in range(c4)], repeats)
                tsp = _graph_time([lambda i=i: torch_ops.sparse_matmul(xs[i], *csr[i], n) for i in range(c4)], repeats)
                row.update({"lut3_us": round(t3, 2), "lut3_speedup": round(t16 / t3, 2),
                            "lut3_gbs": round(gbs(bytes3 + 2 * m * k, t3)),
                            # outliers added in the GEMV epilogue: extra time over the dense kernel alone
                            "int4+sparse_us": round(t4s, 2), "sparse_cost_int4": round(t4s / t4 - 1, 3),
                            "lut3+sparse_us": round(t3s, 2), "sparse_cost_lut3": round(t3s / t3 - 1, 3),
                            "sparse_alone_us": round(tsp, 2)})
            rows.append(row)
            log(str(row))
    had = []
    for n in (4096, 11008, 14336):   # 2^12, 172 * 2^6, 28 * 2^9
        xs = [torch.randn(4096, n, generator=g, device=dev, dtype=torch.float16) for _ in range(copies(4 * 4096 * n))]
        th = _graph_time([lambda x=x: torch_ops.hadamard(x) for x in xs], repeats)
        tc = _graph_time([lambda x=x: x.clone() for x in xs], repeats)
        had.append({"n": n, "rows": 4096, "hadamard_us": round(th, 1), "copy_us": round(tc, 1), "ratio": round(th / tc, 2)})
        log(str(had[-1]))
    return {"device": name, "peak_gbs": peak, "copy_gbs": round(copy_gbs), "l2_mib": round(l2 / 2**20),
            "rows": rows, "hadamard": had}


def kernels_table(rep: dict) -> str:
    """Markdown tables of `bench_kernels`' results."""
    lines = [f"{rep['device']}: datasheet {rep['peak_gbs']} GB/s, device-to-device copy {rep['copy_gbs']} GB/s "
             f"(read + write), L2 {rep['l2_mib']} MiB", "",
             "| K | N | batch | cuBLAS fp16 µs | int4 µs | × fp16 | int4 GB/s (% peak) | 3-bit LUT µs | × fp16 "
             "| + outliers, int4 | + outliers, LUT |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        frac = f" ({100 * r['int4_bw_frac']:.0f}%)" if "int4_bw_frac" in r else ""
        lut = (f"{r['lut3_us']} | {r['lut3_speedup']} | {100 * r['sparse_cost_int4']:+.1f}% | "
               f"{100 * r['sparse_cost_lut3']:+.1f}%") if "lut3_us" in r else "| | |"
        lines.append(f"| {r['K']} | {r['N']} | {r['batch']} | {r['cublas_fp16_us']} | {r['int4_us']} | "
                     f"{r['int4_speedup']} | {r['int4_gbs']}{frac} | {lut} |")
    lines += ["", "| Hadamard n | rows | µs | copy µs | × copy |", "|---|---|---|---|---|"]
    lines += [f"| {h['n']} | {h['rows']} | {h['hadamard_us']} | {h['copy_us']} | {h['ratio']} |" for h in rep["hadamard"]]
    return "\n".join(lines)
