"""lowbit as a library: load, compile, evaluate, export and run a model. The `lowbit` command
line, the benchmarks and the tests call these functions.

Example (stories260K from the shared data, a 260K-parameter Llama):

    from lowbit.tools import api

    art = api.compile("stories260K/stories260K.bin", recipe="w4-rtn-g32-asym", out="stories-w4")
    print(api.evaluate(art.ir, "tinystories/valid-snippet.txt", max_tokens=4096)["ppl"])
    print(api.run("stories-w4", "Once upon a time", max_new_tokens=20)["text"])
    api.export("stories-w4", "stories-w4.onnx")          # KV-cache decoder, int4 as MatMulNBits

A model is a Hugging Face checkpoint directory, a .gguf file, a llama2.c .bin checkpoint, a
lowbit artifact directory, or the default model's name ('smollm2-135m', fetched once). Errors a
user can act on raise LowbitError with a one-line message. Progress is reported through the
`lowbit` logger."""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from lowbit.ir.errors import LowbitError
from lowbit.ir.graph import IR
from lowbit.ir.load import cache_dir, default_max_memory, package_version
from lowbit.ir.store import Spill

log = logging.getLogger("lowbit")


@dataclass
class Compiled:
    """What `compile` produced: the compiled IR, the manifest written beside it, seconds per pass."""
    ir: IR
    manifest: dict
    seconds: list[tuple[str, float]]
    out: Path | None


def load(model, tokenizer: str | None = None, max_memory: int | None = None) -> IR:
    """Load and capture a model (or load an artifact) into the IR. A checkpoint whose float32
    weights take more than half of `max_memory` bytes (default: half of physical memory) stays on
    disk, its tensors read when needed."""
    from lowbit.ir.load import load as load_ir
    from lowbit.tools.defaults import resolve
    path, name, source_hash = resolve(model)
    return load_ir(path, tokenizer, name, source_hash, max_memory)


def pipeline_text(recipe: str | None = None, passes: str | None = None) -> tuple[str, str | None]:
    """(pipeline text, recipe name) from a recipe name or pipeline text (default: the default recipe)."""
    from lowbit.passes import DEFAULT_RECIPE, RECIPES
    if passes and recipe:
        raise LowbitError("give a recipe or a pipeline, not both")
    if passes:
        return passes, None
    name = recipe or DEFAULT_RECIPE
    if name not in RECIPES:
        raise LowbitError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return RECIPES[name][0], name


def compile(model, recipe: str | None = None, *, passes: str | None = None, calib=None, out=None, seed: int = 0,
            tokenizer: str | None = None, force: bool = False, dump_ir=None, verify: bool = False,
            diff: bool = False, provenance: bool = False, progress: bool = True,
            max_memory: int | None = None, dump_ir_changed: bool = False, dump_ir_tree: bool = False,
            repro=None, device: str = "cpu") -> Compiled:
    """Run a recipe (or a pipeline text) on a model; with `out`, write the artifact there.
    calib: a text file for the passes that calibrate (never the evaluation text).

    A model larger than `max_memory` allows (see `load`) compiles with its tensors on disk: read
    when a pass needs them, and what passes write moves to spill files past a quarter of the
    budget. With `out`, finished pieces of long passes are kept beside it (`.NAME.resume`) until
    the artifact is written: the same command after an interruption resumes from them.

    A pass that fails (or, with `diff`, breaks its contract) leaves a reproducer in `repro` (by
    default OUT.repro beside the artifact when `diff`, `verify` or `dump_ir` is on: the IR before each
    pass is kept meanwhile, which holds the tensors a pass replaces until it ends): `lowbit debug
    repro DIR` reruns exactly that pass.
    dump_ir: the IR as text before and after each pass (dump_ir_changed: only after passes that
    changed it; dump_ir_tree: a directory per pass with the IR, its diff and the pass's stats).

    Launched by torchrun (`torchrun --nproc-per-node N -m lowbit.tools.cli compile ...`), the
    processes split the calibration windows: Hessians and Fisher sums are added over them, every
    process then quantizes alike, and the first writes the artifact.

    device="cuda": GPTQ's calibration walk, its Hessians and its column walk run on the GPU (under
    torchrun, each process on the GPU of its local rank); the artifact is the same format."""
    from lowbit.ir.artifact import check_output_dir, is_artifact, point_at, read_manifest, save_artifact, scratch_dir
    from lowbit.ir.load import sha256_files
    from lowbit.passes import PassContext, PassManager
    from lowbit.passes.instruments import DumpIR, NumericDiff, Provenance, Reproducer, Timing, Verify
    from lowbit.passes.pipeline import PipelineError
    from lowbit.tools.evaluate import read_text, windows
    from lowbit.tools.report import storage

    if out is not None:
        check_output_dir(Path(out), force)
    t0 = time.perf_counter()
    text, recipe = pipeline_text(recipe, passes)
    done = read_manifest(model).get("pipeline_entries", []) if is_artifact(model) else []
    pm = PassManager(text, done=done)   # parsed and checked before the (slow) load: typos fail fast
    rank = _join_ranks()
    device = _compile_device(device)
    torch.manual_seed(seed)
    ir = load(model, tokenizer, max_memory)
    calib_info, calib_win = None, None
    if calib:
        calib_win = windows(ir.tokenizer.encode(read_text(calib)), min(512, ir.info.max_ctx), 128 * 512)
        calib_info = {"path": str(calib), "sha256": sha256_files([calib]), "windows": len(calib_win)}
    if ir.stored:
        beside = Path(out).parent if out else cache_dir()
        beside.mkdir(parents=True, exist_ok=True)
        spill = scratch_dir("lowbit-spill-", beside)   # a killed compile's is removed
        ir.spill = Spill(spill, (max_memory or default_max_memory()) // 4)
        weakref.finalize(ir, shutil.rmtree, spill, True)
    resume = _resume_dir(Path(out), {"source": ir.info.source_hash, "pipeline": text, "done": done, "seed": seed,
                                     "calibration": calib_info and calib_info["sha256"],
                                     "lowbit": package_version("lowbit")}, rank) if out is not None else None
    timing = Timing()
    pm.instruments = [timing] + ([Provenance()] if provenance else []) \
        + ([DumpIR(dump_ir, dump_ir_changed, dump_ir_tree)] if dump_ir else []) + ([Verify()] if verify else [])
    diff_inputs = torch.randint(0, ir.info.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed)) \
        if diff else None
    if diff:
        pm.instruments.append(NumericDiff(diff_inputs))
    if repro is None and (diff or verify or dump_ir) and out is not None and rank == 0:   # debugging: keep a reproducer
        repro = Path(out).parent / f"{Path(out).name}.repro"
    if repro:
        pm.instruments.append(reproducer := Reproducer(repro, diff_inputs))
    log.info("running %s", pm)
    try:
        pm.run(ir, PassContext(seed=seed, calib=calib_win, progress=progress, resume=resume, device=device))
    except PipelineError as e:
        if repro and reproducer.written:
            raise PipelineError(f"{e}; a reproducer is in {repro} (lowbit debug repro {repro})") from e
        raise
    manifest = {"lowbit_version": package_version("lowbit"), "torch_version": torch.__version__,
                "transformers_version": package_version("transformers"), "python": platform.python_version(),
                "seed": seed, "recipe": recipe, "calibration": calib_info, "device": str(device),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "compile_seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                "storage": {k: v for k, v in storage(ir).items() if k != "linears"}}
    if out is not None and rank == 0:
        save_artifact(ir, Path(out), manifest, force=force)
        point_at(ir, Path(out))
        shutil.rmtree(resume, ignore_errors=True)
        log.info("wrote %s in %ss (peak memory %.0f MB)", out, manifest["compile_seconds"], manifest["peak_rss_mb"])
    return Compiled(ir, manifest, timing.seconds, Path(out) if out is not None else None)


def _join_ranks() -> int:
    """This process's rank; under torchrun (WORLD_SIZE > 1), joins the process group first (NCCL
    where there is a GPU, gloo otherwise)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank() if dist.is_initialized() else 0


def _compile_device(device: str) -> torch.device:
    """The device a compile calibrates on: the CPU, or a GPU (under torchrun, its local rank's)."""
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise LowbitError(f"--device {device}: compile runs on cpu or cuda")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {device}: torch sees no CUDA device")
        if d.index is None:
            d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(d)
    return d


def _resume_dir(out: Path, key: dict, rank: int = 0) -> Path:
    """Where a compile into `out` keeps finished pieces; what an earlier compile with other inputs
    left there is discarded (by rank 0, while the others wait)."""
    d = out.parent / f".{out.name}.resume"
    key_file = d / "key.json"
    if rank == 0:
        if d.exists() and (not key_file.exists() or json.loads(key_file.read_text()) != key):
            log.info("discarding %s: left by a compile with other inputs", d)
            shutil.rmtree(d)
        if d.exists():
            log.info("resuming from %s", d)
        d.mkdir(parents=True, exist_ok=True)
        key_file.write_text(json.dumps(key))
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
    return d


def evaluate(model, text, *, ctx: int = 512, max_tokens: int = 32768, batch: int = 4, backend: str = "torch",
             accuracy_level: int = 4, progress: bool = True, max_memory: int | None = None,
             tokenizer: str | None = None) -> dict:
    """Perplexity of a model, artifact or IR on a text file: its first `max_tokens` tokens in
    windows of `ctx`, through the torch reference runtime or onnxruntime (`backend='ort'`). A model
    too large for `max_memory` (see `load`) runs node by node, its weights read as they are used.
    An exported file (ONNX, onnxruntime-genai folder, compressed-tensors directory, lowbit's GGUF)
    runs in its own runtime (tools/deployed.py); `tokenizer` for one that carries none."""
    from lowbit.tools.deployed import open_deployed
    from lowbit.tools.evaluate import check_ctx, perplexity, read_text, windows
    text = read_text(text)
    dep = None if isinstance(model, (Compiled, IR)) else open_deployed(model, tokenizer)
    if dep is not None:   # an exported file, run by the runtime it was made for
        check_ctx(ctx, dep.max_ctx)
        t = time.perf_counter()
        res = perplexity(dep.logits, windows(dep.tokenizer.encode(text), ctx, max_tokens), batch=batch, progress=progress)
        return {**res, "seconds": round(time.perf_counter() - t, 2), "backend": dep.kind}
    ir = model.ir if isinstance(model, Compiled) else model if isinstance(model, IR) else load(model, max_memory=max_memory)
    check_ctx(ctx, ir.info.max_ctx)
    if ir.tokenizer is None:
        raise LowbitError(f"{ir.info.source} carries no tokenizer")
    win = windows(ir.tokenizer.encode(text), ctx, max_tokens)
    if backend == "torch" and ir.stored:
        logits = ir
    elif backend == "torch":
        from lowbit.backends.reference import ReferenceBackend
        logits = ReferenceBackend(ir).logits
    elif backend == "ort":
        from lowbit.backends.onnx import OrtBackend, export_onnx
        with tempfile.TemporaryDirectory() as tmp:
            log.info("exporting to ONNX (flavor ort, accuracy level %d) for onnxruntime", accuracy_level)
            logits = OrtBackend(export_onnx(ir, Path(tmp) / "model.onnx", accuracy_level=accuracy_level)).logits
    else:
        raise LowbitError(f"backend must be torch or ort, not '{backend}'")
    t = time.perf_counter()
    res = perplexity(logits, win, batch=batch, progress=progress)
    return {**res, "seconds": round(time.perf_counter() - t, 2), "backend": backend}


def export(artifact, out, *, format: str = "onnx", flavor: str = "ort", form: str = "decoder",
           accuracy_level: int = 4, gguf_float: str = "q8_0") -> Path:
    """Export an artifact: ONNX (flavor ort, qdq or trt; the KV-cache decoder or the full-sequence
    form), an onnxruntime-genai folder (format 'onnx-genai': the ort decoder, tokenizer files and
    genai_config.json), a compressed-tensors checkpoint directory (format 'compressed-tensors', for
    vLLM and transformers), a GGUF file (format 'gguf', for llama.cpp), or a TensorRT engine (format 'trt', built from the trt flavor; needs TensorRT)."""
    from lowbit.backends.onnx import export_onnx
    from lowbit.ir.artifact import is_artifact
    if not is_artifact(artifact):
        raise LowbitError(f"{artifact}: not a lowbit artifact (no manifest.json and graph.json)")
    if format == "trt":
        from lowbit.backends.tensorrt import build_engine
        with tempfile.TemporaryDirectory() as tmp:
            return build_engine(export_onnx(load(artifact), Path(tmp) / "model.onnx", "trt"), Path(out))
    if format == "onnx-genai":
        from lowbit.backends.genai import export_genai
        return export_genai(load(artifact), Path(out), Path(artifact) / "tokenizer", accuracy_level)
    if format == "gguf":
        from lowbit.backends.gguf import export_gguf
        return export_gguf(load(artifact), Path(out), Path(artifact) / "tokenizer", gguf_float)
    if format == "compressed-tensors":
        from lowbit.backends.compressed import export_compressed_tensors
        return export_compressed_tensors(load(artifact), Path(out), Path(artifact) / "tokenizer") / "model.safetensors"
    if format != "onnx":
        raise LowbitError(f"format must be onnx, onnx-genai, compressed-tensors, gguf or trt, not '{format}'")
    return export_onnx(load(artifact), Path(out), flavor, form, accuracy_level)


def decoder(model, backend: str = "torch", device: str = "cpu", accuracy_level: int = 4):
    """(KV-cache decoder, tokenizer) of a model or artifact: the torch reference runtime (on the
    CPU, or a GPU with the CUDA plugins) or onnxruntime over the artifact's ONNX export."""
    from lowbit.tools.generate import TorchDecoder
    if backend == "torch":
        ir = model if isinstance(model, IR) else load(model)
        if device == "cuda" and not torch.cuda.is_available():
            raise LowbitError("--device cuda: torch sees no CUDA device")
        return TorchDecoder(ir, device), ir.tokenizer
    from lowbit.backends.onnx import OrtBackend, cached_export
    from lowbit.ir.artifact import is_artifact
    from lowbit.ir.load import load_tokenizer
    if not is_artifact(model):
        raise LowbitError(f"{model}: --backend ort runs a lowbit artifact (compile one first)")
    return OrtBackend(cached_export(model, "ort", accuracy_level, log=log.info)), load_tokenizer(Path(model) / "tokenizer")


def run(model, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
        backend: str = "torch", device: str = "cpu", accuracy_level: int = 4, on_text=None,
        tokenizer: str | None = None) -> dict:
    """Generate a continuation of `prompt` token by token (greedy unless temperature > 0); returns
    the text, the new ids and prefill/decode speeds. on_text(piece) receives the text as it grows."""
    from lowbit.tools.deployed import open_deployed
    from lowbit.tools.generate import generate
    if max_new_tokens < 1:
        raise LowbitError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    dep = None if isinstance(model, IR) else open_deployed(model, tokenizer)
    if dep is not None:   # an exported file, generating greedily in the runtime it was made for
        if temperature > 0:
            raise LowbitError(f"{model}: an exported file generates greedily here (sampling: run the artifact)")
        ids = dep.tokenizer.encode(prompt)
        if not ids:
            raise LowbitError("the prompt is empty")
        t = time.perf_counter()
        new = dep.greedy(ids, max_new_tokens, getattr(dep.tokenizer, "eos_id", None))
        text = dep.tokenizer.decode(new)
        if on_text:
            on_text(text)
        return {"ids": new, "text": text, "backend": dep.kind, "seconds": round(time.perf_counter() - t, 3),
                "prompt_tokens": len(ids)}
    dec, tok = decoder(model, backend, device, accuracy_level)
    if tok is None:
        raise LowbitError(f"{model} carries no tokenizer")
    ids = tok.encode(prompt)
    if not ids:
        raise LowbitError("the prompt is empty")
    shown = []

    def show(t):   # decode the whole continuation each time: tokens need not be whole characters
        prev = tok.decode(shown)
        shown.append(t)
        if on_text:
            on_text(tok.decode(shown)[len(prev):])
    res = generate(dec, ids, max_new_tokens, temperature, top_k, seed, eos=getattr(tok, "eos_id", None), on_token=show)
    return {**res, "text": tok.decode(shown), "backend": dec.name}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where Linux has it (ru_maxrss also counts the peak
    of the process that started this one: a vfork-and-exec child inherits it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
