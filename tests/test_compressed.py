"""compressed-tensors checkpoints (`lowbit export --format compressed-tensors`), loaded by
transformers through the compressed-tensors package: the logits are the artifact's."""
import json

import pytest
import torch

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import load
from lowbit.tools import api
from models import STORIES, need_data, tiny_hf_dir

pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed (pip install 'lowbit[compressed]')")
ROTATED_GPTQ = "fold-norms,fuse-rotations{kind=hadamard},quantize-weights{method=gptq,bits=4,group=%s,sym=true}"


def _transformers_logits(path, x):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(x).logits


SCALED_GPTQ = "scale-channels,quantize-weights{method=gptq,bits=4,group=%s,sym=true,offset=signed}"


@pytest.mark.parametrize("source,group,passes", [("stories", -1, ROTATED_GPTQ), ("qwen2", 32, ROTATED_GPTQ),
                                                 ("qwen2", 32, SCALED_GPTQ)])
def test_transformers_loads_gptq_weights(tmp_path, source, group, passes):
    """R1/R2 fused into the weights, norms folded (their modules made pure normalizations), int4
    GPTQ per channel (stories260K) or in groups of 32 with biases (a Qwen2 config); or channel
    scales moved into the norms, values and up projections, then GPTQ on Q4_0's signed grid
    (negative scales where a group's extreme is positive)."""
    calib = need_data("tinyshakespeare", "input.txt")
    if source == "qwen2":
        tiny_hf_dir(tmp_path / "m", "qwen2", torch.bfloat16)
    model = str(STORIES if source == "stories" else tmp_path / "m")
    api.compile(model, passes=passes % group, calib=calib, out=tmp_path / "a", progress=False)
    api.export(str(tmp_path / "a"), tmp_path / "ct", format="compressed-tensors")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = next(iter(cfg["config_groups"].values()))["weights"]
    assert cfg["format"] == "pack-quantized" and weights["symmetric"] and weights["num_bits"] == 4
    assert weights["strategy"] == ("channel" if group == -1 else "group")
    x = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    ref = load(str(tmp_path / "a"))(x)
    assert ((_transformers_logits(tmp_path / "ct", x) - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    if source == "stories":   # the directory is an input of `lowbit eval` itself (through transformers)
        got = api.evaluate(str(tmp_path / "ct"), calib, ctx=256, max_tokens=2048, tokenizer=str(tmp_path / "a" / "tokenizer"),
                           progress=False)
        want = api.evaluate(str(tmp_path / "a"), calib, ctx=256, max_tokens=2048, progress=False)
        assert got["backend"] == "compressed-tensors" and abs(got["ppl"] / want["ppl"] - 1) < 1e-4


@pytest.mark.parametrize("passes,why", [
    ("fold-norms,fuse-rotations,insert-hadamard,quantize-weights{group=-1,sym=true}", "lowbit.hadamard.* no form"),
    ("quantize-weights{group=-1,sym=false}", "asymmetric weights"),
    ("quantize-weights{method=squeezellm,bits=4,samples=2}", "lowbit.dequantize_lut.* no form"),
])
def test_what_the_format_cannot_hold_is_refused_by_node(tmp_path, passes, why):
    calib = need_data("tinyshakespeare", "input.txt")
    need_data("stories260K", "stories260K.bin")
    api.compile(str(STORIES), passes=passes, calib=calib, out=tmp_path / "a", progress=False)
    with pytest.raises(LowbitError, match=f"compressed-tensors: node '\\w+'.*{why}"):
        api.export(str(tmp_path / "a"), tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct" / "model.safetensors").exists()


def test_groups_that_do_not_divide_k_are_refused(tmp_path):
    need_data("stories260K", "stories260K.bin")
    api.compile(str(STORIES), passes="quantize-weights{method=rtn,bits=4,group=32,sym=true}", out=tmp_path / "a",
                progress=False)   # stories260K's MLP: K = 172
    with pytest.raises(LowbitError, match="group 32 does not divide K = 172"):
        api.export(str(tmp_path / "a"), tmp_path / "ct", format="compressed-tensors")
