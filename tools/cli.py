"""The `lowbit` command line: compile, eval, inspect, passes, export, run, bench, demo. Each command
is a thin layer over lowbit.tools.api."""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from lowbit.ir.errors import LowbitError
from lowbit.tools import api


# -- commands -------------------------------------------------------------------------------------
def cmd_compile(args):
    res = api.compile(args.model, args.recipe, passes=args.passes, calib=args.calib, out=args.out, seed=args.seed,
                      tokenizer=args.tokenizer, force=args.force, dump_ir=args.dump_ir, verify=args.verify,
                      diff=args.diff, provenance=args.provenance, max_memory=args.max_memory,
                      dump_ir_changed=args.dump_ir_changed, dump_ir_tree=args.dump_ir_tree, repro=args.repro,
                      device=args.device)
    man, st = res.manifest, res.manifest["storage"]
    for name, sec in res.seconds:
        print(f"  {sec:8.2f}s  {name}")
    print(f"bits/weight {st['bits_per_weight']}  size {st['total_bytes'] / 2**20:.1f} MiB  "
          f"compile {man['compile_seconds']}s  peak {man['peak_rss_mb']:.0f} MB  -> {args.out}")


def cmd_eval(args):
    res = api.evaluate(args.model, args.text, ctx=args.ctx, max_tokens=args.max_tokens, batch=args.batch,
                       backend=args.backend, accuracy_level=args.accuracy_level, max_memory=args.max_memory,
                       tokenizer=args.tokenizer)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"ppl {res['ppl']:.4f}  ({res['windows']} windows x {res['ctx']} tokens, {res['backend']}, {res['seconds']}s)")


def cmd_passes(args):
    from lowbit.tools.docs import passes_markdown, passes_text
    print(passes_markdown() if args.markdown else passes_text(), end="")


def cmd_inspect(args):
    from lowbit.ir.artifact import is_artifact
    from lowbit.tools.report import format_inspect, inspect_artifact
    if not is_artifact(args.artifact):
        raise LowbitError(f"{args.artifact}: not a lowbit artifact (no manifest.json and graph.json)")
    rep = inspect_artifact(args.artifact)
    print(json.dumps(rep, indent=2, default=str) if args.json else format_inspect(rep))


def cmd_demo(args):
    """Compile the default model with the default recipe and compare perplexity, FP vs compiled."""
    from lowbit.passes import DEFAULT_RECIPE
    from lowbit.tools.defaults import DEFAULT_MODEL, DEMO_TEXT
    text = args.text or DEMO_TEXT
    ir_fp = api.load(DEFAULT_MODEL)
    log.info("evaluating FP on %s (first %d tokens, ctx %d)", Path(text).name, args.max_tokens, args.ctx)
    fp = api.evaluate(ir_fp, text, ctx=args.ctx, max_tokens=args.max_tokens)
    del ir_fp
    res = api.compile(DEFAULT_MODEL, DEFAULT_RECIPE, out=args.out, force=True)
    log.info("evaluating the compiled model")
    q = api.evaluate(res, text, ctx=args.ctx, max_tokens=args.max_tokens)
    man, st = res.manifest, res.manifest["storage"]
    print(f"\nSmolLM2-135M-Instruct, {Path(text).name}, {fp['windows']} windows x {fp['ctx']} tokens\n")
    print(f"| {'model':<28} | {'ppl':>8} | {'delta':>7} | {'bits/weight':>11} | {'size MiB':>8} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 10}|")
    fp_mib = (st['other_bytes'] + st['quantized_weights'] * 4) / 2**20
    print(f"| {'fp32':<28} | {fp['ppl']:>8.3f} | {'':>7} | {32:>11} | {fp_mib:>8.1f} |")
    print(f"| {DEFAULT_RECIPE:<28} | {q['ppl']:>8.3f} | {q['ppl'] - fp['ppl']:>+7.3f} | "
          f"{st['bits_per_weight']:>11} | {st['total_bytes'] / 2**20:>8.1f} |")
    print(f"\nartifact: {args.out}  (compile {man['compile_seconds']}s, peak {man['peak_rss_mb']:.0f} MB)")
    print(f"inspect it with: lowbit inspect {args.out}")


def cmd_export(args):
    path = api.export(args.artifact, args.out, format=args.format, flavor=args.flavor, form=args.form,
                      accuracy_level=args.accuracy_level, gguf_float=args.gguf_float)
    log.info("wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)


def cmd_run(args):
    print(args.prompt, end="", flush=True)
    res = api.run(args.model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, seed=args.seed, backend=args.backend, device=args.device,
                  accuracy_level=args.accuracy_level, on_text=lambda t: print(t, end="", flush=True),
                  tokenizer=args.tokenizer)
    print()
    if "prefill_s" not in res:   # an exported file, run by its own runtime
        log.info("%s: %d tokens in %.2fs", res["backend"], len(res["ids"]), res["seconds"])
        return
    log.info("%s: prefill %d tokens at %.0f tok/s, decode %d tokens at %.1f tok/s", res["backend"],
             res["prefill_tokens"], res["prefill_tokens"] / res["prefill_s"], res["decode_tokens"],
             res["decode_tokens"] / res["decode_s"])


def cmd_bench_kernels(args):
    from lowbit.tools.bench import bench_kernels, kernels_table
    rep = bench_kernels(repeats=args.repeats, log=log.info)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "kernels.md").write_text(kernels_table(rep) + "\n")
    print(kernels_table(rep))


def cmd_plugins_build(args):
    import time

    from lowbit.plugins.build import build
    t = time.perf_counter()
    lib = build(Path(args.out) if args.out else None)
    log.info("built %s (%.1f MiB) in %.1fs", lib, lib.stat().st_size / 2**20, time.perf_counter() - t)


def cmd_bench_decode(args):
    from lowbit.tools.bench import bench_decode, decode_markdown
    levels = args.accuracy_levels.split(",")
    if not all(x in ("0", "1", "2", "3", "4") for x in levels):
        raise LowbitError(f"--accuracy-levels takes MatMulNBits levels 0-4, comma-separated, not '{args.accuracy_levels}'")
    rep = bench_decode(args.artifacts, args.model, Path(args.out), [int(x) for x in levels],
                       args.prompt_tokens, args.new_tokens, args.repeats, args.threads, args.gguf, log=log.info)
    print(json.dumps(rep, indent=2) if args.json else decode_markdown(rep))
    log.info("tables written to %s/decode.md and decode.json", args.out)


def cmd_bench_quality(args):
    from lowbit.tools.bench import DEFAULT_RECIPES, bench_quality, markdown
    from lowbit.tools.peers import PEERS
    recipes = args.recipes.split(",") if args.recipes is not None else list(DEFAULT_RECIPES)
    peers = args.peers.split(",") if args.peers is not None else list(PEERS)
    rep = bench_quality(args.model, args.text, args.calib, [r for r in recipes if r], [p for p in peers if p],
                        Path(args.out), args.ctx, args.max_tokens, args.gguf, log=log.info)
    print(json.dumps(rep, indent=2) if args.json else markdown(rep))
    log.info("tables written to %s/quality.md and quality.json", args.out)


def cmd_bench_scale(args):
    from lowbit.tools.bench_scale import bench_scale, scale_table
    rep = bench_scale(Path(args.out), [x for x in args.shapes.split(",") if x], [x for x in args.methods.split(",") if x],
                      args.calib, args.max_memory, args.samples, args.device, log=log.info)
    print(scale_table(rep))
    log.info("tables written to %s/scale.md and scale.json", args.out)


def cmd_debug_compare(args):
    from lowbit.tools import debug
    rep = debug.compare(args.a, args.b, text=args.text, inputs=args.inputs, save_inputs=args.save_inputs,
                        windows=args.windows, ctx=args.ctx, a_backend=args.a_backend, b_backend=args.b_backend,
                        min_sqnr=args.min_sqnr)
    print(debug.write_json(rep) if args.json else debug.markdown(rep), end="")


def cmd_debug_bisect(args):
    from lowbit.tools import debug
    rep = debug.bisect(args.model, args.passes, text=args.text, calib=args.calib, max_ppl=args.max_ppl,
                       min_sqnr=args.min_sqnr, nan=args.nan, ctx=args.ctx, max_tokens=args.max_tokens, seed=args.seed,
                       log=log.info)
    print(json.dumps(rep, indent=1) if args.json else debug.bisect_markdown(rep), end="")


def cmd_debug_precision(args):
    from lowbit.tools import debug
    rep = debug.precision(args.model, recipe=args.recipe, passes=args.passes, text=args.text, calib=args.calib,
                          high=args.high, target_ppl=args.target_ppl, max_bpw=args.max_bpw, samples=args.samples,
                          ctx=args.ctx, max_tokens=args.max_tokens, seed=args.seed, log=log.info)
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1))
    print(json.dumps(rep, indent=1) if args.json else debug.precision_markdown(rep), end="")


def cmd_debug_repro(args):
    from lowbit.tools import debug
    rep = debug.repro(args.dir)
    print(f"pass: {rep['pass']}\nrecorded: {rep['recorded']}")
    print(f"reproduced: {rep['error']}" if rep["reproduced"] else "not reproduced: the pass ran and kept its contract")
    if rep["reproduced"]:
        sys.exit(1)


def cmd_report(args):
    from lowbit.ir.artifact import is_artifact
    from lowbit.tools.html_report import write
    if not is_artifact(args.artifact):
        raise LowbitError(f"{args.artifact}: not a lowbit artifact (no manifest.json and graph.json)")
    if args.bench and not (Path(args.bench) / "quality.json").is_file():
        raise LowbitError(f"{args.bench}: no quality.json (the --out of lowbit bench quality)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LowbitError("the report's plots need matplotlib: pip install 'lowbit[report]'") from None
    out = write(args.artifact, args.html or f"{Path(args.artifact).name}-report.html", args.bench)
    log.info("wrote %s", out)


# -- arguments ------------------------------------------------------------------------------------
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _size(text: str) -> int:
    """argparse type: a size in bytes such as 8GB, 512MiB or 2e9."""
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([kmgt]i?)?b?\s*", text.lower())
    try:
        v = int(float(m.group(1)) * _UNITS[m.group(2) or ""]) if m else 0
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 8GB or 512MiB, got '{text}'")
    return v


_EXPORTED_HELP = ("or an exported file, run by its own runtime: a .onnx file (onnxruntime), an onnxruntime-genai "
                  "folder, a compressed-tensors directory (transformers), a .gguf lowbit wrote (llama.cpp)")
_MAX_MEMORY_HELP = ("memory for weights, e.g. 8GB (default: half of physical memory): a model whose float32 "
                    "weights take more than half of it stays on disk and is read as passes need it")


def _count(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {v}")
        return v
    return parse


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line `lowbit: error: ...`, exit 2, like every other error."""

    def error(self, message):
        raise LowbitError(f"{self.prog.removeprefix('lowbit ')}: {message}")


def _add_compile(sub):
    c = sub.add_parser("compile", help="compile a model into an artifact directory")
    c.add_argument("model", help="HF checkpoint dir, .gguf, llama2.c .bin, artifact, or 'smollm2-135m'")
    c.add_argument("--out", required=True)
    c.add_argument("--recipe")
    c.add_argument("--passes", help="pipeline text, e.g. 'fold-norms,quantize-weights{bits=4,group=128}'")
    c.add_argument("--calib", help="calibration text file (never the evaluation text)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tokenizer", help="tokenizer path, when it is not beside the model")
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR as text before and after each pass")
    c.add_argument("--dump-ir-changed", action="store_true", help="with --dump-ir: only after passes that changed it")
    c.add_argument("--dump-ir-tree", action="store_true",
                   help="with --dump-ir: a directory per pass (NN-pass/ir.txt, diff.txt, stats.json)")
    c.add_argument("--verify", action="store_true", help="check IR invariants after each pass")
    c.add_argument("--diff", action="store_true", help="check each pass's numerical contract on fixed inputs")
    c.add_argument("--provenance", action="store_true", help="stamp each new node with the pass that made it")
    c.add_argument("--repro", metavar="DIR", help="where a failing pass leaves a reproducer (lowbit debug repro DIR); "
                                                   "default with --diff, --verify or --dump-ir: OUT.repro")
    c.add_argument("--max-memory", type=_size, help=_MAX_MEMORY_HELP)
    c.add_argument("--device", default="cpu", help="where GPTQ calibrates and quantizes: cpu (default) or cuda")
    c.set_defaults(fn=cmd_compile)


def _add_eval(sub):
    e = sub.add_parser("eval", help="perplexity of a model, artifact or exported file on a text")
    e.add_argument("model", help=_EXPORTED_HELP)
    e.add_argument("--tokenizer", help="tokenizer folder, for an exported file that carries none")
    e.add_argument("--text", required=True)
    e.add_argument("--ctx", type=_count(2), default=512)
    e.add_argument("--max-tokens", type=_count(2), default=32768, help="evaluate the first N tokens (default 32768)")
    e.add_argument("--batch", type=_count(1), default=4, help="windows per forward")
    e.add_argument("--backend", choices=["torch", "ort"], default="torch",
                   help="torch: the reference runtime; ort: exported to ONNX (flavor ort) and run by onnxruntime")
    e.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="with --backend ort: MatMulNBits accuracy level (0 exact float, 4 int8 activations)")
    e.add_argument("--max-memory", type=_size, help=_MAX_MEMORY_HELP)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)


def _add_export(sub):
    x = sub.add_parser("export", help="export an artifact to ONNX, onnxruntime-genai, compressed-tensors, GGUF or TensorRT")
    x.add_argument("artifact")
    x.add_argument("--format", choices=["onnx", "onnx-genai", "compressed-tensors", "gguf", "trt"], default="onnx",
                   help="onnx-genai: an onnxruntime-genai folder (the ort decoder, tokenizer, genai_config.json); "
                        "compressed-tensors: a Hugging Face directory vLLM and transformers load (uniform int weights); "
                        "gguf: a file llama.cpp runs (Q4_0/Q8_0: symmetric groups of 32); "
                        "trt: a TensorRT engine built from the trt-flavor ONNX (needs TensorRT)")
    x.add_argument("--flavor", choices=["ort", "qdq", "trt"], default="ort",
                   help="ort: com.microsoft::MatMulNBits; qdq: standard ONNX (blocked INT4 DequantizeLinear); "
                        "trt: qdq plus lowbit-domain nodes for the TensorRT plugins")
    x.add_argument("--form", choices=["decoder", "full"], default="decoder",
                   help="decoder: KV cache in and out (past_key_values.* / present.*); full: input_ids -> logits")
    x.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="MatMulNBits accuracy level: 0 computes in float (exact), 4 with int8 activations (fast)")
    x.add_argument("--gguf-float", choices=["q8_0", "q4_0", "f32"], default="q8_0",
                   help="gguf: the tensors left in float (embedding, output): q8_0 as llama.cpp's 4-bit files, "
                        "q4_0 (smaller), or f32")
    x.add_argument("--out", required=True)
    x.set_defaults(fn=cmd_export)


def _add_run(sub):
    r = sub.add_parser("run", help="generate text from a prompt with the KV-cache decoder")
    r.add_argument("model", help="artifact (or, with --backend torch, any model spec); " + _EXPORTED_HELP)
    r.add_argument("--prompt", required=True)
    r.add_argument("--tokenizer", help="tokenizer folder, for an exported file that carries none")
    r.add_argument("--backend", choices=["torch", "ort"], default="torch")
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="with --backend torch: cuda runs the plugins' kernels (lowbit plugins build)")
    r.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4)
    r.add_argument("--max-new-tokens", type=_count(1), default=64)
    r.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0: greedy")
    r.add_argument("--top-k", type=_count(0), default=0)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_run)


def _add_bench(sub):
    b = sub.add_parser("bench", help="benchmarks: quality (perplexity against peers), decode (speed), scale (memory), kernels")
    bsub = b.add_subparsers(dest="bench", required=True)
    bq = bsub.add_parser("quality", help="perplexity and bits per weight of FP, lowbit recipes and peer quantizers")
    bq.add_argument("--model", default="smollm2-135m")
    bq.add_argument("--text", required=True, help="evaluation text")
    bq.add_argument("--calib", required=True, help="calibration text (not the evaluation text)")
    bq.add_argument("--recipes", help="comma-separated lowbit recipes (default: a set covering every method)")
    bq.add_argument("--peers", help="comma-separated peers (default: all; see lowbit.tools.peers)")
    bq.add_argument("--out", default="lowbit-out/bench-quality", help="artifacts, per-row results (resumable), tables")
    bq.add_argument("--ctx", type=_count(2), default=512)
    bq.add_argument("--max-tokens", type=_count(2), default=32768)
    bq.add_argument("--gguf", action="store_true",
                    help="also each recipe's GGUF export run in llama.cpp (beside the llamacpp-* peers: llama.cpp's "
                         "own quantizer)")
    bq.add_argument("--json", action="store_true")
    bq.set_defaults(fn=cmd_bench_quality)

    bd = bsub.add_parser("decode", help="prefill/decode tokens/s: onnxruntime int4 against the fp32 export and llama.cpp")
    bd.add_argument("artifacts", nargs="*", help="compiled artifacts to export and time")
    bd.add_argument("--model", default="smollm2-135m", help="source model: its float export is the baseline")
    bd.add_argument("--gguf", help="GGUF for the llama.cpp row (default: the default model's own Q4_1 GGUF)")
    bd.add_argument("--accuracy-levels", default="4,0")
    bd.add_argument("--prompt-tokens", type=_count(1), default=64)
    bd.add_argument("--new-tokens", type=_count(2), default=64)
    bd.add_argument("--repeats", type=_count(1), default=3)
    bd.add_argument("--threads", type=_count(1), default=os.cpu_count())
    bd.add_argument("--out", default="lowbit-out/bench-decode")
    bd.add_argument("--json", action="store_true")
    bd.set_defaults(fn=cmd_bench_decode)

    bs = bsub.add_parser("scale", help="peak memory and time of compiling random-weight Llama shapes, 135M to 7B")
    bs.add_argument("--shapes", default="135m,1.1b,3b,7b", help="from 135m, 1.1b, 3b, 7b")
    bs.add_argument("--methods", default="rtn,gptq", help="from rtn, gptq, shaped (shape-noise, then W4A4KV4 with RTN), quarot (QuaRot rotations, then RTN)")
    bs.add_argument("--max-memory", type=_size, default=4 << 30, help="the compiles' --max-memory (default 4GiB)")
    bs.add_argument("--samples", type=_count(1), default=8, help="calibration windows of 512 tokens (GPTQ, shape-noise)")
    bs.add_argument("--calib", help="calibration text (default: a packaged text; the weights are random)")
    bs.add_argument("--device", default="cpu", help="the compiles' --device: cpu (default) or cuda")
    bs.add_argument("--out", default="lowbit-out/bench-scale", help="checkpoints, artifacts, per-row results")
    bs.set_defaults(fn=cmd_bench_scale)

    bk = bsub.add_parser("kernels", help="CUDA kernels against cuBLAS fp16 (needs a GPU)")
    bk.add_argument("--repeats", type=_count(1), default=20)
    bk.add_argument("--out", default="lowbit-out/bench-kernels")
    bk.set_defaults(fn=cmd_bench_kernels)


def _add_debug(sub):
    d = sub.add_parser("debug", help="find where accuracy goes: compare two runs value by value")
    dsub = d.add_subparsers(dest="debug", required=True, parser_class=_Parser)
    c = dsub.add_parser("compare", help="two runs (models, artifacts, ONNX files; torch or onnxruntime) tap by tap: "
                                        "each linear's output, each block's, the logits")
    c.add_argument("a", help="model, artifact or .onnx file lowbit exported")
    c.add_argument("b", help="the same kinds; an artifact against its source compares in the artifact's basis")
    c.add_argument("--text", help="token windows from this text")
    c.add_argument("--inputs", help="token windows saved by --save-inputs (instead of --text)")
    c.add_argument("--save-inputs", metavar="FILE", help="write the windows used, to repeat the comparison")
    c.add_argument("--windows", type=_count(1), default=2)
    c.add_argument("--ctx", type=_count(2), default=128)
    c.add_argument("--a-backend", choices=["torch", "ort", "cuda"], default="torch")
    c.add_argument("--b-backend", choices=["torch", "ort", "cuda"], default="torch")
    c.add_argument("--min-sqnr", type=float, default=20.0, help="report the first tap below this SQNR (dB)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_debug_compare)

    b = dsub.add_parser("bisect", help="the first pass, then the first of its applications, that breaks a model")
    b.add_argument("model")
    b.add_argument("--passes", required=True, help="the pipeline to search")
    b.add_argument("--text", required=True, help="token windows the criterion is measured on")
    b.add_argument("--calib", help="calibration text, for passes that need it")
    crit = b.add_argument_group("criterion (one or more)")
    crit.add_argument("--max-ppl", type=float, help="broken: perplexity on the windows above this")
    crit.add_argument("--min-sqnr", type=float, help="broken: logits SQNR against the model as loaded below this (dB)")
    crit.add_argument("--nan", action="store_true", help="broken: NaN or Inf in the logits (a pass error always is)")
    b.add_argument("--ctx", type=_count(2), default=128)
    b.add_argument("--max-tokens", type=_count(2), default=2048)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(fn=cmd_debug_bisect)

    p = dsub.add_parser("precision", help="which linears a recipe should keep at higher precision to reach a "
                                          "perplexity or fill a size: a mixed-precision pipeline")
    p.add_argument("model")
    p.add_argument("--recipe")
    p.add_argument("--passes", help="a pipeline instead of a recipe")
    p.add_argument("--text", required=True, help="perplexity of each candidate on this text")
    p.add_argument("--calib", required=True, help="calibration text (sensitivities; passes that calibrate)")
    p.add_argument("--high", help="options over the recipe's quantize-weights for the promoted linears "
                                  "(default: one more bit), e.g. bits=4,group=64")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target-ppl", type=float, help="the fewest promoted linears reaching this perplexity")
    goal.add_argument("--max-bpw", type=float, help="the most promoted linears within these bits per weight")
    p.add_argument("--samples", type=_count(1), default=16, help="calibration windows for the Fisher information")
    p.add_argument("--ctx", type=_count(2), default=512)
    p.add_argument("--max-tokens", type=_count(2), default=32768)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the report (with the full ranking) as JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_debug_precision)

    r = dsub.add_parser("repro", help="rerun the pass a failed compile's reproducer recorded (exit 1: it fails again)")
    r.add_argument("dir", help="the reproducer directory (a failed compile names it: OUT.repro)")
    r.set_defaults(fn=cmd_debug_repro)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="lowbit", description="Compile LLMs into low-bit models.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_compile(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_run(sub)
    p = sub.add_parser("passes", help="list passes and recipes")
    p.add_argument("--markdown", action="store_true", help="the reference page (docs/passes.md)")
    p.set_defaults(fn=cmd_passes)
    i = sub.add_parser("inspect", help="pipeline, per-pass stats and bits per weight of an artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)
    _add_bench(sub)
    _add_debug(sub)
    rp = sub.add_parser("report", help="an HTML page of an artifact: per-linear SQNR and bits, passes, plots")
    rp.add_argument("artifact")
    rp.add_argument("--html", metavar="FILE", help="where to write it (default: ARTIFACT-report.html here)")
    rp.add_argument("--bench", metavar="DIR", help="a bench quality directory: perplexity against bits per weight")
    rp.set_defaults(fn=cmd_report)
    pl = sub.add_parser("plugins", help="CUDA kernels: build")
    plsub = pl.add_subparsers(dest="plugins", required=True, parser_class=_Parser)
    pb = plsub.add_parser("build", help="compile plugins/kernels.cu with nvcc for sm_80 and sm_90")
    pb.add_argument("--out", help="output directory (default: ~/.cache/lowbit/plugins)")
    pb.set_defaults(fn=cmd_plugins_build)
    d = sub.add_parser("demo", help="compile the default model and compare perplexity with FP")
    d.add_argument("--out", default="lowbit-out/smollm2-135m-w4-rtn")
    d.add_argument("--text", help="evaluation text (default: the bundled WikiText-2 test head)")
    d.add_argument("--ctx", type=_count(2), default=512)
    d.add_argument("--max-tokens", type=_count(2), default=32768)
    d.set_defaults(fn=cmd_demo)
    return ap


log = logging.getLogger("lowbit")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (tests and callers may replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr():
    """Library progress (the `lowbit` logger) as `lowbit: message` lines on stderr."""
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("lowbit: %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv=None):
    _log_to_stderr()
    try:
        args = build_parser().parse_args(argv)
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
