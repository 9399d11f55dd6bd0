"""GPTQModel as a `lowbit bench quality` peer, run as a script by a Python that has gptqmodel
(its pins on torch, transformers and numpy differ from lowbit's, so it lives in its own
environment; this file imports nothing of lowbit).

    python gptqmodel_peer.py MODEL_DIR WINDOWS.safetensors RECIPE GROUP OUT.json

WINDOWS holds `calib` and `eval` token windows (lowbit's, so every row sees the same tokens).
RECIPE: gptq (int4 asymmetric, act-order desc_act=True, the given group) or gptq-w3 (the same in
int3), quantized on the CPU.
The quantized model is saved as GPTQModel's checkpoint (GPTQ format) and loaded back with its
TORCH kernel on the CPU; perplexity is exp(mean NLL of every token after the first in each
window), as lowbit computes it. Bits per weight count what that checkpoint stores per quantized
linear: its qweight, scales and qzeros tensors (g_idx, the act-order permutation, left out)."""
import json
import os
import sys
import tempfile
import time

import torch

from peer_eval import perplexity   # beside this file

# its CPU pool defaults to (cores+1)//2 workers, yet its model loader asks for 2: on a 2-core machine
# that is "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def main(model_dir, windows, recipe, group, out):
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from safetensors import safe_open
    from safetensors.torch import load_file
    t0 = time.time()
    w = load_file(windows)
    calib, ev = w["calib"], w["eval"]
    if recipe not in ("gptq", "gptq-w3"):
        raise SystemExit(f"unknown recipe {recipe}")
    cfg = QuantizeConfig(bits=3 if recipe == "gptq-w3" else 4, group_size=int(group), sym=False, desc_act=True)
    model = GPTQModel.load(model_dir, cfg, device="cpu", dtype=torch.float32)
    model.quantize([{"input_ids": row.tolist()} for row in calib], batch_size=1)
    with tempfile.TemporaryDirectory() as qdir:
        model.save(qdir)
        del model
        with safe_open(f"{qdir}/model.safetensors", "pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}
        # its TORCH kernel loads only as fp16/bf16 and dequantizes to the input's dtype: the model is
        # cast to fp32 and its unquantized tensors (embeddings, norms) put back as saved, in fp32
        model = GPTQModel.load(qdir, device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16).model.float()
    packed = (".qweight", ".scales", ".qzeros", ".g_idx")
    _, unexpected = model.load_state_dict({k: v for k, v in t.items() if not k.endswith(packed)}, strict=False)
    assert not unexpected, unexpected
    bits = n = 0
    for key in t:
        if key.endswith(".qweight"):
            base = key[:-len(".qweight")]
            n += t[base + ".scales"].shape[1] * t[base + ".g_idx"].numel()   # out * in
            bits += sum(t[base + s].numel() * t[base + s].element_size() * 8 for s in packed[:3])
    ppl = perplexity(model, ev)
    with open(out, "w") as f:
        json.dump({"ppl": ppl, "bits_per_weight": round(bits / n, 4), "seconds": round(time.time() - t0),
                   "versions": {"gptqmodel": gptqmodel.__version__, "torch": torch.__version__,
                                "transformers": __import__("transformers").__version__}}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
