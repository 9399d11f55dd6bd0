"""llm-compressor as a `lowbit bench quality` peer, run as a script by a Python that has
llm-compressor (its pins on transformers and compressed-tensors differ from lowbit's, so it lives
in its own environment; this file imports nothing of lowbit).

    python llmcompressor_peer.py MODEL_DIR WINDOWS.safetensors RECIPE GROUP OUT.json

WINDOWS holds `calib` and `eval` token windows (lowbit's, so every row sees the same tokens).
RECIPE: gptq (GPTQModifier, int4 asymmetric, act-order, the given group), quip-gptq (QuIPModifier's
random Hadamards, online on every linear's input and output, then the same GPTQ) or spinquant-gptq
(SpinQuantModifier's R1 and R2 Hadamards, fused into the weights, then GPTQ). The quantized model
runs in memory as llm-compressor leaves it (fake-quantized forward); perplexity is exp(mean NLL of
every token after the first in each window), as lowbit computes it. Bits per weight count what
its checkpoint stores per quantized linear: 4-bit codes, an fp16 scale and a 4-bit zero point per
group."""
import json
import sys
import time

import torch

from peer_eval import perplexity   # beside this file


def main(model_dir, windows, recipe, group, out):
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    t0 = time.time()
    w = load_file(windows)
    calib, ev = w["calib"], w["eval"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mods = []
    if recipe == "quip-gptq":
        from llmcompressor.modifiers.transform import QuIPModifier
        mods.append(QuIPModifier(transform_type="random-hadamard", ignore="lm_head"))
    elif recipe == "spinquant-gptq":
        from llmcompressor.modifiers.transform import SpinQuantModifier
        mods.append(SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"))
    elif recipe != "gptq":
        raise SystemExit(f"unknown recipe {recipe}")
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": int(group),
               "actorder": "static"}
    mods.append(GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]))
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=ds, recipe=mods, max_seq_length=calib.shape[1], num_calibration_samples=len(calib))
    ppl = perplexity(model, ev)
    bits = n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale"):
            n += m.weight.numel()
            bits += 4 * m.weight.numel() + 16 * m.weight_scale.numel() + 4 * m.weight_zero_point.numel()
    import llmcompressor
    with open(out, "w") as f:
        json.dump({"ppl": ppl, "bits_per_weight": round(bits / n, 4), "seconds": round(time.time() - t0),
                   "versions": {"llmcompressor": llmcompressor.__version__,
                                "transformers": __import__("transformers").__version__}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
