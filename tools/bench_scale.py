"""`lowbit bench scale`: memory and time of compiling models larger than memory, against model size.

It writes random-weight Llama-shaped checkpoints (bf16 safetensors shards, the default model's
tokenizer and vocabulary) and compiles each with RTN and with GPTQ (or with `shaped`: shape-noise, then
W4A4KV4 with RTN weights) in a child process under one --max-memory budget, recording the child's
peak resident memory (its own high-water mark, which it reports as it exits) and wall time. Random
weights measure memory and time only; real models measure quality. Each row is kept in OUT/rows/
under a key of what it depends on, so an interrupted run resumes."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import checkpoint_keys

# name -> (hidden, intermediate, layers, heads, kv heads): the bodies of SmolLM2-135M, TinyLlama-1.1B,
# Llama-3.2-3B and Llama-2-7B (the vocabulary is the default model's tokenizer's, 49152)
SHAPES = {"135m": (576, 1536, 30, 9, 3), "1.1b": (2048, 5632, 22, 32, 4), "3b": (3072, 8192, 28, 24, 8),
          "7b": (4096, 11008, 32, 32, 32)}
METHODS = {"rtn": "quantize-weights{method=rtn,bits=4,group=128,sym=false}",
           "gptq": "quantize-weights{method=gptq,bits=4,group=128,sym=false,samples=%d}",
           # shape-noise's walk and matrices (on the same windows), then W4A4KV4 with RTN weights
           "shaped": "shape-noise{samples=%d},quantize-activations{bits=4,clip=0.9},quantize-kv{bits=4,clip=0.95},"
                     "quantize-weights{method=rtn,bits=4,group=128,sym=false}",
           # QuaRot's rewrites (norms folded, R1 and R2 fused, down's input rotated), then RTN weights
           "quarot": "fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                     "quantize-weights{method=rtn,bits=4,group=128,sym=false}"}


def write_checkpoint(directory: Path, shape: str, seed: int = 0, shard_bytes: int = 2 << 30) -> int:
    """A random-weight Llama of `shape` in bf16 safetensors shards (linears N(0, 0.02), norms 1), the
    default model's tokenizer beside it; returns the parameter count. Built tensor by tensor: memory
    holds one shard."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.ir.load import load_tokenizer
    from lowbit.tools.defaults import default_model_dir
    hidden, inter, layers, heads, kv = SHAPES[shape]
    tok = load_tokenizer(default_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=False, torch_dtype="bfloat16")
    with init_empty_weights():
        names = [(n, p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).named_parameters()]
    tmp = directory.with_name(directory.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shard, size, files, total = {}, 0, 0, 0
    for name, s in names:
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen).mul_(0.02)
        shard[name] = t.to(torch.bfloat16)
        size += shard[name].numel() * 2
        total += shard[name].numel()
        if size >= shard_bytes or name == names[-1][0]:
            files += 1
            save_file(shard, tmp / f"model-{files:05d}.safetensors", metadata={"format": "pt"})
            shard, size = {}, 0
    cfg.save_pretrained(tmp)
    tok.save(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return total


# The child reports its own peak as it exits. Not ru_maxrss from wait4: a child started by vfork
# and exec inherits its parent's high-water mark there (Linux keeps the larger), and this process
# peaks at a few GB while it writes a checkpoint.
_CHILD = """import runpy, sys
try:
    runpy.run_module("lowbit.tools.cli", run_name="__main__")
finally:
    from lowbit.tools.api import peak_rss_mb
    print("lowbit-peak-mb", peak_rss_mb(), file=sys.stderr)
"""


def _compile_child(model: Path, pipeline: str, calib: str, out: Path, max_memory: int, device: str = "cpu") -> dict:
    """Compile in a child process; its wall time, peak resident memory (its own: `peak_rss_mb`) and
    the most disk it took (spill files, resume records and the artifact: the disk's use, sampled
    each second, less its use at the start)."""
    cmd = [sys.executable, "-c", _CHILD, "compile", str(model), "--passes", pipeline, "--calib", calib,
           "--out", str(out), "--force", "--max-memory", str(max_memory), "--device", device]
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    used0, disk, done = shutil.disk_usage(out.parent).used, [0], threading.Event()

    def sample():
        while not done.wait(1.0):
            disk[0] = max(disk[0], shutil.disk_usage(out.parent).used - used0)
    threading.Thread(target=sample, daemon=True).start()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    proc.wait()
    done.set()
    err, _, peak_mb = err.partition("lowbit-peak-mb ")
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise LowbitError(f"compile of {model.name} failed (exit {proc.returncode}): "
                          f"{(err.strip().splitlines() or ['no output'])[-1]}")
    return {"seconds": round(wall, 1), "peak_rss_gb": round(float(peak_mb) / 1024, 2),
            "peak_disk_gb": round(disk[0] / 1e9, 2)}


def bench_scale(out: Path, shapes=("135m", "1.1b", "3b", "7b"), methods=("rtn", "gptq"), calib: str | None = None,
                max_memory: int = 4 << 30, samples: int = 8, device: str = "cpu", log=print) -> dict:
    from lowbit.tools.defaults import DEMO_TEXT
    unknown = [s for s in shapes if s not in SHAPES] + [m for m in methods if m not in METHODS]
    if unknown:
        raise LowbitError(f"unknown shape or method {', '.join(unknown)} (shapes: {', '.join(SHAPES)}; "
                          f"methods: {', '.join(METHODS)})")
    out, calib = Path(out), str(calib or DEMO_TEXT)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in shapes:
        ckpt = out / "models" / shape
        if not (ckpt / "config.json").exists():
            log(f"{shape}: writing a random bf16 checkpoint")
            write_checkpoint(ckpt, shape)
        cfg = json.loads((ckpt / "config.json").read_text())
        params = sum(math.prod(shape) for _, shape in checkpoint_keys(sorted(ckpt.glob("*.safetensors"))).values())
        for method in methods:
            pipeline = METHODS[method] % samples if "%d" in METHODS[method] else METHODS[method]
            key = {"shape": shape, "pipeline": pipeline, "max_memory": max_memory, "calib": calib, "device": device}
            f = out / "rows" / f"{shape}-{method}.json"
            if f.is_file() and json.loads(f.read_text()).get("key") == key:
                log(f"{shape} {method}: kept from an earlier run")
                rows.append(json.loads(f.read_text()))
                continue
            log(f"{shape} {method}: compiling ({params / 1e9:.2f}B parameters)")
            res = _compile_child(ckpt, pipeline, calib, out / "artifacts" / f"{shape}-{method}", max_memory, device)
            row = {"key": key, "shape": shape, "method": method, "params_b": round(params / 1e9, 3),
                   "bf16_gb": round(2 * params / 1e9, 2), "blocks": cfg["num_hidden_layers"], **res,
                   "seconds_per_block": round(res["seconds"] / cfg["num_hidden_layers"], 2)}
            f.write_text(json.dumps(row, indent=1))
            rows.append(row)
            log(f"{shape} {method}: {res['seconds']} s, peak {res['peak_rss_gb']} GiB, disk {res['peak_disk_gb']} GB")
    rep = {"max_memory_gb": round(max_memory / 2**30, 2), "samples": samples, "device": device, "rows": rows}
    (out / "scale.json").write_text(json.dumps(rep, indent=1))
    (out / "scale.md").write_text(scale_table(rep))
    return rep


def scale_table(rep: dict) -> str:
    lines = [f"max memory {rep['max_memory_gb']} GiB; GPTQ on {rep['samples']} windows of 512; "
             f"calibration on {rep.get('device', 'cpu')} (peak resident: the host's memory)", "",
             "| shape | parameters | bf16 on disk | method | wall | per block | peak resident | disk written |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        disk = f"{r['peak_disk_gb']:.1f} GB" if "peak_disk_gb" in r else "-"
        lines.append(f"| {r['shape']} | {r['params_b']:.2f} B | {r['bf16_gb']:.1f} GB | {r['method']} | "
                     f"{r['seconds']:.0f} s | {r['seconds_per_block']:.1f} s | {r['peak_rss_gb']:.2f} GiB | {disk} |")
    return "\n".join(lines) + "\n"
