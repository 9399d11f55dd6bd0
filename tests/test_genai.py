"""onnxruntime-genai folders (`lowbit export --format onnx-genai`), loaded and run by
onnxruntime_genai itself: it generates the greedy tokens lowbit's reference runtime does."""
import json

import pytest

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import load
from lowbit.tools import api
from lowbit.tools.generate import TorchDecoder, generate
from models import STORIES, need_data, tiny_hf_dir

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'lowbit[genai]')")


def test_rotated_int4_stories_generates_the_reference_tokens(tmp_path):
    """stories260K with rotations, online Hadamards and int4 GPTQ: onnxruntime-genai's greedy
    tokens from a prompt are the reference runtime's (up to its end-of-text token)."""
    calib = need_data("tinyshakespeare", "input.txt")
    need_data("stories260K", "stories260K.bin")
    art = tmp_path / "a"
    api.compile(str(STORIES), "quarot-w4-gptq", calib=calib, out=art, progress=False)
    api.export(str(art), tmp_path / "g", format="onnx-genai", accuracy_level=0)
    cfg = json.loads((tmp_path / "g" / "genai_config.json").read_text())["model"]
    ir = load(str(art))
    assert (cfg["decoder"]["num_hidden_layers"], cfg["decoder"]["num_key_value_heads"], cfg["vocab_size"]) == (5, 4, 512)
    assert not (tmp_path / "g" / "tokenizer.json").exists()   # llama2.c's tokenizer: ids only
    prompt = "Once upon a time, there was a little"
    ref = generate(TorchDecoder(ir), ir.tokenizer.encode(prompt), 40, eos=cfg["eos_token_id"])["ids"]
    # the folder is an input of `lowbit run`, which generates in onnxruntime-genai (tools/deployed.py)
    tok = str(art / "tokenizer")
    got = api.run(str(tmp_path / "g"), prompt, max_new_tokens=40, tokenizer=tok)
    assert got["backend"] == "onnx-genai" and len(ref) >= 20 and got["ids"][:len(ref)] == ref
    text = need_data("tinyshakespeare", "input.txt")
    folder = api.evaluate(str(tmp_path / "g"), text, ctx=256, max_tokens=2048, tokenizer=tok, progress=False)
    onnx = api.evaluate(str(tmp_path / "g" / "model.onnx"), text, ctx=256, max_tokens=2048, tokenizer=tok, progress=False)
    torch_ref = api.evaluate(str(art), text, ctx=256, max_tokens=2048, progress=False)
    assert folder["backend"] == "onnx-genai" and onnx["backend"] == "onnx" and folder["ppl"] == onnx["ppl"]
    assert abs(folder["ppl"] / torch_ref["ppl"] - 1) < 1e-4


def test_tokenizer_goes_along_and_a_quantized_cache_is_refused(tmp_path):
    tiny_hf_dir(tmp_path / "m", "qwen2")
    api.compile(str(tmp_path / "m"), "w4-rtn", out=tmp_path / "a", progress=False)
    api.export(str(tmp_path / "a"), tmp_path / "g", format="onnx-genai")
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {f.name for f in (tmp_path / "g").iterdir()}
    og.Tokenizer(og.Model(str(tmp_path / "g")))   # onnxruntime-genai reads the tokenizer files
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 50)
    api.compile(str(tmp_path / "m"), "w4a8kv8", calib=calib, out=tmp_path / "kv", progress=False)
    with pytest.raises(LowbitError, match="float KV cache"):
        api.export(str(tmp_path / "kv"), tmp_path / "g2", format="onnx-genai")
