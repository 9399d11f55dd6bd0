"""The `lowbit` command line: compile, eval, inspect, passes, bench, demo."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from lowbit.ir.errors import LowbitError

DATA_DIR = Path(__file__).parent / "data"
DEMO_TEXT = DATA_DIR / "wikitext2-test-head.txt"


def _log(msg: str):
    print(f"lowbit: {msg}", file=sys.stderr, flush=True)


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pipeline_text(args) -> tuple[str, str | None]:
    from lowbit.passes import DEFAULT_RECIPE, RECIPES
    if args.passes and args.recipe:
        raise LowbitError("give --recipe or --passes, not both")
    if args.passes:
        return args.passes, None
    name = args.recipe or DEFAULT_RECIPE
    if name not in RECIPES:
        raise LowbitError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return RECIPES[name][0], name


def _load(spec: str, tokenizer=None):
    from lowbit.ir.load import load
    _log(f"loading {spec}")
    t = time.perf_counter()
    ir = load(spec, tokenizer)
    _log(f"loaded and captured in {time.perf_counter() - t:.1f}s")
    return ir


def compile_model(model: str, out: Path, pipeline: str, recipe: str | None = None, calib: str | None = None,
                  seed: int = 0, tokenizer=None, force: bool = False, dump_ir=None, verify=False, diff=False,
                  provenance=False, progress=True):
    from lowbit.ir.artifact import save_artifact
    from lowbit.ir.load import sha256_files
    from lowbit.passes import PassContext, PassManager
    from lowbit.passes.instruments import DumpIR, NumericDiff, Provenance, Timing, Verify
    from lowbit.tools.evaluate import read_text, windows

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise LowbitError(f"{out} exists and is not empty (use --force to replace it)")
    t0 = time.perf_counter()
    pm = PassManager(pipeline)   # parse before the (slow) load, so typos fail fast
    torch.manual_seed(seed)
    ir = _load(model, tokenizer)
    calib_info, calib_win = None, None
    if calib:
        text = read_text(calib)
        calib_win = windows(ir.tokenizer.encode(text), min(512, ir.info.max_ctx), 128 * 512)
        calib_info = {"path": str(calib), "sha256": sha256_files([calib]), "windows": len(calib_win)}
    timing = Timing()
    instruments = [timing]
    if provenance:
        instruments.append(Provenance())
    if dump_ir:
        instruments.append(DumpIR(dump_ir))
    if verify:
        instruments.append(Verify())
    if diff:
        gen = torch.Generator().manual_seed(seed)
        instruments.append(NumericDiff(torch.randint(0, ir.info.vocab_size, (2, 64), generator=gen)))
    _log(f"running {pm}")
    pm.instruments = instruments
    pm.run(ir, PassContext(seed=seed, calib=calib_win, progress=progress))
    from lowbit.tools.report import storage
    manifest = {"lowbit_version": _version("lowbit"), "torch_version": torch.__version__,
                "transformers_version": _version("transformers"), "python": platform.python_version(),
                "seed": seed, "recipe": recipe, "calibration": calib_info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "compile_seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(_peak_rss_mb(), 1),
                "storage": {k: v for k, v in storage(ir).items() if k != "linears"}}
    save_artifact(ir, out, manifest, force=force)
    _log(f"wrote {out} in {manifest['compile_seconds']}s (peak memory {manifest['peak_rss_mb']:.0f} MB)")
    return ir, manifest, timing


def evaluate(model_or_ir, text_path, ctx=512, max_tokens=32768, batch=4, progress=True, backend="torch",
             accuracy_level: int = 4) -> dict:
    from lowbit.tools.evaluate import check_ctx, perplexity, read_text, windows
    text = read_text(text_path)
    ir = _load(model_or_ir) if isinstance(model_or_ir, str) else model_or_ir
    check_ctx(ctx, ir.info.max_ctx)
    if ir.tokenizer is None:
        raise LowbitError(f"{ir.info.source} carries no tokenizer")
    win = windows(ir.tokenizer.encode(text), ctx, max_tokens)
    if backend == "torch":
        from lowbit.backends.reference import ReferenceBackend
        logits = ReferenceBackend(ir).logits
    else:
        import tempfile

        from lowbit.backends.onnx import OrtBackend, export_onnx
        with tempfile.TemporaryDirectory() as tmp:
            _log(f"exporting to ONNX (flavor ort, accuracy level {accuracy_level}) for onnxruntime")
            logits = OrtBackend(export_onnx(ir, Path(tmp) / "model.onnx", accuracy_level=accuracy_level)).logits
    t = time.perf_counter()
    res = perplexity(logits, win, batch=batch, progress=progress)
    res["seconds"] = round(time.perf_counter() - t, 2)
    res["backend"] = backend
    return res


# -- commands -------------------------------------------------------------------------------------
def cmd_compile(args):
    pipeline, recipe = _pipeline_text(args)
    _, man, timing = compile_model(args.model, Path(args.out), pipeline, recipe, args.calib, args.seed,
                                   args.tokenizer, args.force, args.dump_ir, args.verify, args.diff,
                                   args.provenance)
    st = man["storage"]
    for name, sec in timing.seconds:
        print(f"  {sec:8.2f}s  {name}")
    print(f"bits/weight {st['bits_per_weight']}  size {st['total_bytes'] / 2**20:.1f} MiB  "
          f"compile {man['compile_seconds']}s  peak {man['peak_rss_mb']:.0f} MB  -> {args.out}")


def cmd_eval(args):
    res = evaluate(args.model, args.text, args.ctx, args.max_tokens, args.batch, backend=args.backend,
                   accuracy_level=args.accuracy_level)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"ppl {res['ppl']:.4f}  ({res['windows']} windows x {res['ctx']} tokens, {res['backend']}, {res['seconds']}s)")


def cmd_passes(args):
    from dataclasses import fields

    from lowbit.passes import REGISTRY, RECIPES
    from lowbit.passes.base import format_value
    print("passes:")
    for name, cls in sorted(REGISTRY.items()):
        opts = ",".join(f"{f.name}={format_value(f.default)}" for f in fields(cls.Config))
        print(f"  {name:<20} {cls.doc()}")
        if opts:
            print(f"  {'':<20} {name}{{{opts}}}")
    print("\nrecipes:")
    for name, (text, doc) in RECIPES.items():
        print(f"  {name:<20} {doc}\n  {'':<20} {text}")


def cmd_inspect(args):
    from lowbit.ir.artifact import is_artifact
    from lowbit.tools.report import format_inspect, inspect_artifact
    if not is_artifact(args.artifact):
        raise LowbitError(f"{args.artifact}: not a lowbit artifact (no manifest.json and graph.json)")
    rep = inspect_artifact(args.artifact)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_inspect(rep))


def cmd_demo(args):
    """Compile the default model with the default recipe and compare perplexity, FP vs compiled."""
    from lowbit.ir.load import DEFAULT_MODEL
    from lowbit.passes import DEFAULT_RECIPE, RECIPES
    text = args.text or DEMO_TEXT
    out = Path(args.out)
    ir_fp = _load(DEFAULT_MODEL)
    _log(f"evaluating FP on {Path(text).name} (first {args.max_tokens} tokens, ctx {args.ctx})")
    fp = evaluate(ir_fp, text, args.ctx, args.max_tokens)
    del ir_fp
    ir_q, man, _ = compile_model(DEFAULT_MODEL, out, RECIPES[DEFAULT_RECIPE][0], DEFAULT_RECIPE, force=True)
    _log("evaluating the compiled model")
    q = evaluate(ir_q, text, args.ctx, args.max_tokens)
    st = man["storage"]
    print(f"\nSmolLM2-135M-Instruct, {Path(text).name}, {fp['windows']} windows x {fp['ctx']} tokens\n")
    print(f"| {'model':<28} | {'ppl':>8} | {'delta':>7} | {'bits/weight':>11} | {'size MiB':>8} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 10}|")
    fp_mib = (st['other_bytes'] + st['quantized_weights'] * 4) / 2**20
    print(f"| {'fp32':<28} | {fp['ppl']:>8.3f} | {'':>7} | {32:>11} | {fp_mib:>8.1f} |")
    print(f"| {DEFAULT_RECIPE:<28} | {q['ppl']:>8.3f} | {q['ppl'] - fp['ppl']:>+7.3f} | "
          f"{st['bits_per_weight']:>11} | {st['total_bytes'] / 2**20:>8.1f} |")
    print(f"\nartifact: {out}  (compile {man['compile_seconds']}s, peak {man['peak_rss_mb']:.0f} MB)")
    print(f"inspect it with: lowbit inspect {out}")


def cmd_export(args):
    from lowbit.backends.onnx import export_onnx
    from lowbit.ir.artifact import is_artifact
    if not is_artifact(args.artifact):
        raise LowbitError(f"{args.artifact}: not a lowbit artifact (no manifest.json and graph.json)")
    if args.format == "trt":   # the trt-flavor ONNX, then a TensorRT engine from it
        import tempfile

        from lowbit.backends.tensorrt import build_engine
        with tempfile.TemporaryDirectory() as tmp:
            path = build_engine(export_onnx(_load(args.artifact), Path(tmp) / "model.onnx", "trt"), Path(args.out))
    else:
        path = export_onnx(_load(args.artifact), Path(args.out), args.flavor, args.form, args.accuracy_level)
    _log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def cmd_run(args):
    from lowbit.tools.generate import TorchDecoder, generate
    if args.backend == "torch":
        ir = _load(args.model)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise LowbitError("--device cuda: torch sees no CUDA device")
        backend = TorchDecoder(ir, args.device)
        tok = ir.tokenizer
    else:
        from lowbit.backends.onnx import OrtBackend, cached_export
        from lowbit.ir.artifact import is_artifact
        from lowbit.ir.load import load_tokenizer
        if not is_artifact(args.model):
            raise LowbitError(f"{args.model}: --backend ort runs a lowbit artifact (compile one first)")
        backend = OrtBackend(cached_export(args.model, args.flavor, args.accuracy_level, log=_log))
        tok = load_tokenizer(Path(args.model) / "tokenizer")
    if tok is None:
        raise LowbitError(f"{args.model} carries no tokenizer")
    ids = tok.encode(args.prompt)
    if not ids:
        raise LowbitError("the prompt is empty")
    print(args.prompt, end="", flush=True)
    shown = []

    def show(t):   # decode the whole continuation each time: tokens need not be whole characters
        prev = tok.decode(shown)
        shown.append(t)
        print(tok.decode(shown)[len(prev):], end="", flush=True)
    res = generate(backend, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   eos=getattr(tok, "eos_id", None), on_token=show)
    print()
    _log(f"{backend.name}: prefill {res['prefill_tokens']} tokens at {res['prefill_tokens'] / res['prefill_s']:.0f} tok/s, "
         f"decode {res['decode_tokens']} tokens at {res['decode_tokens'] / res['decode_s']:.1f} tok/s")


def cmd_bench_kernels(args):
    from lowbit.tools.bench import bench_kernels, kernels_table
    rep = bench_kernels(repeats=args.repeats, log=_log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "kernels.md").write_text(kernels_table(rep) + "\n")
    print(kernels_table(rep))


def cmd_plugins_build(args):
    from lowbit.plugins.build import build
    t = time.perf_counter()
    lib = build(Path(args.out) if args.out else None)
    _log(f"built {lib} ({lib.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.1f}s")


def cmd_bench_decode(args):
    from lowbit.tools.bench import bench_decode, decode_markdown
    levels = args.accuracy_levels.split(",")
    if not all(x in ("0", "1", "2", "3", "4") for x in levels):
        raise LowbitError(f"--accuracy-levels takes MatMulNBits levels 0-4, comma-separated, not '{args.accuracy_levels}'")
    rep = bench_decode(args.artifacts, args.model, Path(args.out), [int(x) for x in levels],
                       args.prompt_tokens, args.new_tokens, args.repeats, args.threads, args.gguf, log=_log)
    print(json.dumps(rep, indent=2) if args.json else decode_markdown(rep))
    _log(f"tables written to {args.out}/decode.md and decode.json")


def cmd_bench_quality(args):
    from lowbit.tools.bench import DEFAULT_RECIPES, bench_quality, markdown
    from lowbit.tools.peers import PEERS
    recipes = args.recipes.split(",") if args.recipes is not None else list(DEFAULT_RECIPES)
    peers = args.peers.split(",") if args.peers is not None else list(PEERS)
    rep = bench_quality(args.model, args.text, args.calib, [r for r in recipes if r], [p for p in peers if p],
                        Path(args.out), args.ctx, args.max_tokens, log=_log)
    print(json.dumps(rep, indent=2) if args.json else markdown(rep))
    _log(f"tables written to {args.out}/quality.md and quality.json")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Compile LLMs into low-bit models.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact directory")
    c.add_argument("model", help="HF checkpoint dir, .gguf, llama2.c .bin, or 'smollm2-135m'")
    c.add_argument("--out", required=True)
    c.add_argument("--recipe")
    c.add_argument("--passes", help="pipeline text, e.g. 'fold-norms,quantize-weights{bits=4,group=128}'")
    c.add_argument("--calib", help="calibration text file (never the evaluation text)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tokenizer", help="tokenizer path, when it is not beside the model")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR as text before and after each pass")
    c.add_argument("--verify", action="store_true", help="check IR invariants after each pass")
    c.add_argument("--diff", action="store_true", help="check each pass's numerical contract on fixed inputs")
    c.add_argument("--provenance", action="store_true", help="stamp each new node with the pass that made it")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("eval", help="perplexity of a model or artifact on a text")
    e.add_argument("model")
    e.add_argument("--text", required=True)
    e.add_argument("--ctx", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=32768, help="evaluate the first N tokens (default 32768)")
    e.add_argument("--batch", type=int, default=4, help="windows per forward")
    e.add_argument("--backend", choices=["torch", "ort"], default="torch",
                   help="torch: the reference runtime; ort: exported to ONNX (flavor ort) and run by onnxruntime")
    e.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="with --backend ort: MatMulNBits accuracy level (0 exact float, 4 int8 activations)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="export an artifact to ONNX")
    x.add_argument("artifact")
    x.add_argument("--format", choices=["onnx", "trt"], default="onnx",
                   help="trt: a TensorRT engine built from the trt-flavor ONNX (needs TensorRT)")
    x.add_argument("--flavor", choices=["ort", "qdq", "trt"], default="ort",
                   help="ort: com.microsoft::MatMulNBits; qdq: standard ONNX (blocked INT4 DequantizeLinear); "
                        "trt: qdq plus lowbit-domain nodes for the TensorRT plugins")
    x.add_argument("--form", choices=["decoder", "full"], default="decoder",
                   help="decoder: KV cache in and out (past_key_values.* / present.*); full: input_ids -> logits")
    x.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="MatMulNBits accuracy level: 0 computes in float (exact), 4 with int8 activations (fast)")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("run", help="generate text from a prompt with the KV-cache decoder")
    r.add_argument("model", help="artifact (or, with --backend torch, any model spec)")
    r.add_argument("--prompt", required=True)
    r.add_argument("--backend", choices=["torch", "ort"], default="torch")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="with --backend torch: cuda runs the plugins' kernels (lowbit plugins build)")
    r.add_argument("--flavor", choices=["ort"], default="ort")
    r.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_run)

    p = sub.add_parser("passes", help="list passes and recipes")
    p.set_defaults(fn=cmd_passes)

    i = sub.add_parser("inspect", help="pipeline, per-pass stats and bits per weight of an artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    b = sub.add_parser("bench", help="benchmarks: quality (perplexity against peers), decode (speed)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bq = bsub.add_parser("quality", help="perplexity and bits per weight of FP, lowbit recipes and peer quantizers")
    bq.add_argument("--model", default="smollm2-135m")
    bq.add_argument("--text", required=True, help="evaluation text")
    bq.add_argument("--calib", required=True, help="calibration text (not the evaluation text)")
    bq.add_argument("--recipes", help="comma-separated lowbit recipes (default: a set covering every method)")
    bq.add_argument("--peers", help="comma-separated peers (default: all; see lowbit.tools.peers)")
    bq.add_argument("--out", default="lowbit-out/bench-quality", help="artifacts, per-row results (resumable), tables")
    bq.add_argument("--ctx", type=int, default=512)
    bq.add_argument("--max-tokens", type=int, default=32768)
    bq.add_argument("--json", action="store_true")
    bq.set_defaults(fn=cmd_bench_quality)

    bd = bsub.add_parser("decode", help="prefill/decode tokens/s: onnxruntime int4 against the fp32 export and llama.cpp")
    bd.add_argument("artifacts", nargs="*", help="compiled artifacts to export and time")
    bd.add_argument("--model", default="smollm2-135m", help="source model: its float export is the baseline")
    bd.add_argument("--gguf", help="GGUF for the llama.cpp row (default: the default model's own Q4_1 GGUF)")
    bd.add_argument("--accuracy-levels", default="4,0")
    bd.add_argument("--prompt-tokens", type=int, default=64)
    bd.add_argument("--new-tokens", type=int, default=64)
    bd.add_argument("--repeats", type=int, default=3)
    bd.add_argument("--threads", type=int, default=os.cpu_count())
    bd.add_argument("--out", default="lowbit-out/bench-decode")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(fn=cmd_bench_decode)

    pl = sub.add_parser("plugins", help="CUDA kernels: build")
    plsub = pl.add_subparsers(dest="plugins", required=True)
    pb = plsub.add_parser("build", help="compile plugins/kernels.cu with nvcc for sm_80 and sm_90")
    pb.add_argument("--out", help="output directory (default: ~/.cache/lowbit/plugins)")
    pb.set_defaults(fn=cmd_plugins_build)

    bk = bsub.add_parser("kernels", help="CUDA kernels against cuBLAS fp16 (needs a GPU)")
    bk.add_argument("--repeats", type=int, default=20)
    bk.add_argument("--out", default="lowbit-out/bench-kernels")
    bk.set_defaults(fn=cmd_bench_kernels)

    d = sub.add_parser("demo", help="compile the default model and compare perplexity with FP")
    d.add_argument("--out", default="lowbit-out/smollm2-135m-w4-rtn")
    d.add_argument("--text", help="evaluation text (default: the bundled WikiText-2 test head)")
    d.add_argument("--ctx", type=int, default=512)
    d.add_argument("--max-tokens", type=int, default=32768)
    d.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("lowbit: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:   # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main()
