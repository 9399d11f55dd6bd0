"""Peer quantizers for `lowbit bench quality`: other tools' int4 weight quantization of the same
model, evaluated by the same protocol. Each peer quantizes every linear but the output head
(which in these models shares the embedding and stays float, as in lowbit's recipes) and counts
bits per weight from what it stores. A peer whose package is missing is skipped, with the reason."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch


class PeerUnavailable(Exception):
    pass


@dataclass
class Peer:
    what: str
    run: Callable   # (model spec, text path, ctx, max_tokens, out dir, calibration text path) -> row dict


def _need(*pkgs):
    try:
        return {p: metadata.version(p) for p in pkgs}
    except metadata.PackageNotFoundError as e:
        raise PeerUnavailable(f"{e.args[0]} is not installed (pip install {e.args[0]})") from None


def _windows(tok, text, ctx, max_tokens):
    from lowbit.tools.evaluate import read_text, windows
    return windows(tok.encode(read_text(text)), ctx, max_tokens)


# -- onnxruntime's MatMulNBits weight quantizer --------------------------------------------------
class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def _fp32_onnx(model_spec: str, out: Path) -> Path:
    """The fp32 model exported once with torch.onnx (dynamo), kept under OUT/peers."""
    path = out / "peers" / "fp32.onnx"
    if path.is_file():
        return path
    from lowbit.tools.defaults import load_model
    model, _, _ = load_model(model_spec)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=4096)
    prog = torch.onnx.export(_Logits(model).eval(), (torch.randint(0, 100, (2, 64)),), dynamo=True,
                             dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                             input_names=["input_ids"], output_names=["logits"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    prog.save(str(tmp), external_data=False)
    tmp.rename(path)
    return path


def _matmulnbits_bpw(model) -> float:
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    bits = weights = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in node.attribute}
        weights += attrs["K"].i * attrs["N"].i
        bits += sum(8 * numpy_helper.to_array(inits[n]).nbytes for n in node.input[1:4] if n in inits)
    return bits / weights


def _ort(config: str):
    def run(model_spec, text, ctx, max_tokens, out, calib):
        versions = _need("onnxruntime", "onnx")
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)
        from lowbit.tools.defaults import load_model
        from lowbit.tools.evaluate import perplexity
        import logging
        logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)   # one INFO line per node
        fp32 = _fp32_onnx(model_spec, out)
        algo = (HQQWeightOnlyQuantConfig(block_size=128, bits=4) if config == "hqq" else
                DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=config == "rtn-sym", bits=4))
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=algo)
        q.process()
        qmodel = q.model.model
        bpw = _matmulnbits_bpw(qmodel)
        path = out / "peers" / f"ort-{config}.onnx"
        onnx.save(qmodel, str(path))
        del q, qmodel
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        _, tok, _ = load_model(model_spec)
        win = _windows(tok, text, ctx, max_tokens)
        ppl = perplexity(lambda ids: torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy()})[0]),
                         win, progress=False)["ppl"]
        return {"ppl": ppl, "bits_per_weight": round(bpw, 4), "versions": versions}
    return run


# -- hqq and optimum-quanto, on the torch model ------------------------------------------------
def _torch_peer(quantize_fn, pkgs):
    """quantize_fn(model, tokenizer, calibration text path) -> bits per weight, quantizing in place."""
    def run(model_spec, text, ctx, max_tokens, out, calib):
        versions = _need(*pkgs)
        from lowbit.tools.defaults import load_model
        from lowbit.tools.evaluate import perplexity
        model, tok, _ = load_model(model_spec)
        bpw = quantize_fn(model, tok, calib)
        win = _windows(tok, text, ctx, max_tokens)
        with torch.no_grad():
            ppl = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, win, progress=False)["ppl"]
        return {"ppl": ppl, "bits_per_weight": round(bpw, 4), "versions": versions}
    return run


def _linears(model):
    """(parent, attribute name, module) of every nn.Linear except the output head."""
    head = model.get_output_embeddings()
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear) and child is not head]


def _hqq(group: int):
    def quantize(model, tok, calib) -> float:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
        HQQLinear.set_backend(HQQBackend.PYTORCH)
        cfg = BaseQuantizeConfig(nbits=4, group_size=group, axis=1)
        bits = weights = 0
        for parent, name, lin in _linears(model):
            q = HQQLinear(lin, quant_config=cfg, compute_dtype=torch.float32, device="cpu", del_orig=True)
            # hqq keeps scale and zero point in the compute dtype: round them to fp16, what it
            # stores for the usual fp16 model, so the row is what 4 + 32/group bits would run
            q.meta["scale"] = q.meta["scale"].half().float()
            q.meta["zero"] = q.meta["zero"].half().float()
            setattr(parent, name, q)
            weights += q.in_features * q.out_features
            bits += 8 * q.W_q.numel() * q.W_q.element_size() + 16 * (q.meta["scale"].numel() + q.meta["zero"].numel())
        return bits / weights
    return quantize


def _quanto(model, tok, calib) -> float:
    from optimum.quanto import freeze, qint4, quantize
    from optimum.quanto.nn import QModuleMixin
    head = [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    quantize(model, weights=qint4, exclude=head)
    freeze(model)
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QModuleMixin):
            w = m.weight
            data = w._data._data if hasattr(w._data, "_data") else w._data
            weights += m.in_features * m.out_features
            bits += 8 * sum(t.numel() * t.element_size() for t in (data, w._scale, w._shift))
    return bits / weights


# -- AutoRound (sign-gradient rounding and clipping) ---------------------------------------------------
def _autoround(group: int, iters: int, lr: float | None = None, bits: int = 4):
    """Intel's AutoRound on the torch model: each block's rounding offsets and clipping ranges tuned
    by sign-gradient descent against its float output, on the same 64 calibration windows of 512
    tokens lowbit's recipes use (given as token batches). It leaves the weights
    fake-quantized in place with fp16 scales and integer zero points, as its GPTQ-style export
    stores them: bits per weight b + (16 + b) / group."""
    def quantize(model, tok, calib) -> float:
        import logging

        from auto_round import AutoRound

        from lowbit.tools.evaluate import read_text, windows
        logging.getLogger("auto_round").setLevel(logging.WARNING)
        win = windows(tok.encode(read_text(calib)), 512, 64 * 512)
        batches = [win[i:i + 8] for i in range(0, len(win), 8)]   # lowbit's calibration windows, as token batches
        ar = AutoRound(model, tok, bits=bits, group_size=group, sym=False, dataset=batches, nsamples=len(win), seqlen=512,
                       iters=iters, lr=lr, batch_size=8, device_map="cpu", enable_torch_compile=False, seed=0)
        ar.quantize()
        stored = weights = 0
        left = [lin for _, _, lin in _linears(model) if not hasattr(lin, "scale")]
        if left:
            widths = sorted({lin.in_features for lin in left})
            raise PeerUnavailable(f"AutoRound kept {len(left)} of {len(_linears(model))} linears in float at group {group} "
                                  f"(input widths {widths} are not multiples of it)")
        for _, _, lin in _linears(model):
            weights += lin.weight.numel()
            stored += bits * lin.weight.numel() + 16 * lin.scale.numel() + bits * lin.zp.numel()
        return stored / weights
    return quantize


# -- llm-compressor and GPTQModel, each in its own environment ----------------------------------------
_OWN_ENV = {   # tool: (script, the variable naming its Python, why it cannot be an extra, how to make one)
    "llmcompressor": ("llmcompressor_peer.py", "LOWBIT_LLMCOMPRESSOR_PYTHON",
                      "llm-compressor pins transformers<=5.17 and compressed-tensors 0.19",
                      "python -m venv v && v/bin/pip install torch==2.13.0 llmcompressor"),
    "gptqmodel": ("gptqmodel_peer.py", "LOWBIT_GPTQMODEL_PYTHON",
                  "GPTQModel pins numpy 2.2 and, from 7.7, torch>=2.14",
                  "python -m venv v && v/bin/pip install torch==2.13.0 gptqmodel==7.6.0 -c <(echo torch==2.13.0)"),
}


def _own_env(tool: str, recipe: str, group: int):
    """The tool's script (tools/<tool>_peer.py) run by the Python named in its variable: its pins
    conflict with lowbit's, so it cannot be an extra of lowbit's own environment. It gets the model
    as a float32 Hugging Face directory (with its tokenizer) and lowbit's calibration and
    evaluation windows."""
    script, var, why, how = _OWN_ENV[tool]

    def run(model_spec, text, ctx, max_tokens, out, calib):
        import os
        import subprocess

        from safetensors.torch import save_file

        from lowbit.tools.defaults import load_model
        from lowbit.tools.evaluate import read_text, windows
        python = os.environ.get(var)
        if not python:
            raise PeerUnavailable(f"{why}: set {var} to a Python that has it ({how})")
        model, tok, _ = load_model(model_spec)
        d = out / "peers" / "hf-fp32"
        if not (d / "tokenizer_config.json").exists():   # llm-compressor reads the tokenizer from the directory
            model.save_pretrained(d)
            tok.save(d)
        w = out / "peers" / "windows.safetensors"
        save_file({"calib": windows(tok.encode(read_text(calib)), 512, 64 * 512).contiguous(),
                   "eval": _windows(tok, text, ctx, max_tokens).contiguous()}, str(w))
        res = out / "peers" / f"{tool}-{recipe}-g{group}.json"
        proc = subprocess.run([python, str(Path(__file__).with_name(script)), str(d), str(w), recipe, str(group),
                               str(res)], capture_output=True, text=True)
        if proc.returncode:
            raise PeerUnavailable(f"{tool} failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300])
        return json.loads(res.read_text())
    return run


# -- llama.cpp's own quantizer ----------------------------------------------------------------
def _llama_cpp(ftype: str):
    """llama.cpp's quantizer (llama_model_quantize) on a float32 GGUF of the model as loaded (written
    by lowbit), the embedding as Q8_0 as in lowbit's GGUF files; run in llama.cpp on the same tokens."""
    def run(model_spec, text, ctx, max_tokens, out, calib):
        versions = _need("llama-cpp-python", "gguf")
        import ctypes

        import llama_cpp
        from lowbit.backends.gguf import export_gguf, linear_bits_per_weight
        from lowbit.ir.errors import LowbitError
        from lowbit.tools.api import load
        from lowbit.tools.deployed import open_gguf
        from lowbit.tools.evaluate import perplexity
        ir = load(model_spec)
        f32, tok = out / "peers" / "fp32.gguf", out / "peers" / "tokenizer"
        tok.mkdir(parents=True, exist_ok=True)
        ir.tokenizer.save(tok)
        if not f32.is_file():
            try:
                export_gguf(ir, f32, tok, "f32")
            except LowbitError as e:
                raise PeerUnavailable(str(e).splitlines()[0]) from None
        path = out / "peers" / f"llamacpp-{ftype.lower()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        params.token_embedding_type = llama_cpp.GGML_TYPE_Q8_0
        params.nthread = torch.get_num_threads()
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {ftype} failed")
        win = _windows(ir.tokenizer, text, ctx, max_tokens)
        ppl = perplexity(open_gguf(path, tok).logits, win, progress=False)["ppl"]
        return {"ppl": ppl, "bits_per_weight": round(linear_bits_per_weight(path), 4), "versions": versions,
                "size_mib": round(path.stat().st_size / 2**20, 1)}
    return run


PEERS: dict[str, Peer] = {
    "ort-rtn-sym": Peer("onnxruntime MatMulNBits quantizer, RTN int4 symmetric, block 128, run in onnxruntime",
                        _ort("rtn-sym")),
    "ort-rtn-asym": Peer("onnxruntime MatMulNBits quantizer, RTN int4 asymmetric, block 128, run in onnxruntime",
                         _ort("rtn-asym")),
    "ort-hqq": Peer("onnxruntime MatMulNBits quantizer, HQQ int4, block 128, run in onnxruntime", _ort("hqq")),
    "hqq-g128": Peer("hqq int4 (half-quadratic zero/scale fit), group 128, torch", _torch_peer(_hqq(128), ["hqq"])),
    "hqq-g64": Peer("hqq int4 (half-quadratic zero/scale fit), group 64, torch", _torch_peer(_hqq(64), ["hqq"])),
    "quanto-int4": Peer("optimum-quanto qint4 weights (default group 128), torch",
                        _torch_peer(_quanto, ["optimum-quanto"])),
    "autoround-g128": Peer("AutoRound int4 asymmetric, group 128, 200 sign-gradient steps per block, 64 x 512 "
                           "calibration tokens, torch", _torch_peer(_autoround(128, 200), ["auto-round"])),
    "autoround-g64": Peer("AutoRound int4 asymmetric, group 64, 200 sign-gradient steps per block, 64 x 512 "
                          "calibration tokens, torch", _torch_peer(_autoround(64, 200), ["auto-round"])),
    "autoround-light-g64": Peer("AutoRound's light setting (50 sign-gradient steps per block at lr 5e-3), int4 "
                                "asymmetric, group 64, 64 x 512 calibration tokens, torch",
                                _torch_peer(_autoround(64, 50, 5e-3), ["auto-round"])),
    "autoround-light-w3-g128": Peer("AutoRound's light setting (50 sign-gradient steps per block at lr 5e-3), int3 "
                                    "asymmetric, group 128, 64 x 512 calibration tokens, torch",
                                    _torch_peer(_autoround(128, 50, 5e-3, bits=3), ["auto-round"])),
    "gptqmodel-g128": Peer("GPTQModel GPTQ int4 asymmetric, group 128, act-order, its CPU torch kernel (its own "
                           "environment)", _own_env("gptqmodel", "gptq", 128)),
    "gptqmodel-g64": Peer("GPTQModel GPTQ int4 asymmetric, group 64, act-order, its CPU torch kernel (its own "
                          "environment)", _own_env("gptqmodel", "gptq", 64)),
    "gptqmodel-w3-g128": Peer("GPTQModel GPTQ int3 asymmetric, group 128, act-order, its CPU torch kernel (its own "
                              "environment)", _own_env("gptqmodel", "gptq-w3", 128)),
    "llmcompressor-gptq-g128": Peer("llm-compressor GPTQ int4 asymmetric, group 128, act-order (its own environment)",
                                    _own_env("llmcompressor", "gptq", 128)),
    "llmcompressor-gptq-g64": Peer("llm-compressor GPTQ int4 asymmetric, group 64, act-order (its own environment)",
                                   _own_env("llmcompressor", "gptq", 64)),
    "llmcompressor-quip-gptq-g64": Peer("llm-compressor QuIP transforms (random Hadamards online on every linear's "
                                        "input and output) then GPTQ, group 64 (its own environment)",
                                        _own_env("llmcompressor", "quip-gptq", 64)),
    "llmcompressor-spinquant-gptq-g64": Peer("llm-compressor SpinQuant R1 and R2 Hadamards fused into the weights, then "
                                             "GPTQ, group 64 (its own environment)", _own_env("llmcompressor", "spinquant-gptq", 64)),
    "llamacpp-q4_0": Peer("llama.cpp's quantizer, Q4_0 (embedding Q8_0), run in llama.cpp", _llama_cpp("Q4_0")),
    "llamacpp-q4_1": Peer("llama.cpp's quantizer, Q4_1 (embedding Q8_0), run in llama.cpp", _llama_cpp("Q4_1")),
}
