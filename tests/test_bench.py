"""`lowbit bench quality` on stories260K: FP, a lowbit recipe and onnxruntime's quantizer, one run."""
import importlib.util
import json

import pytest
import torch

from lowbit.ir.errors import LowbitError
from lowbit.tools.bench import bench_quality, markdown
from models import DATA, STORIES, need_data


def test_bench_quality_rows_and_resume(tmp_path):
    need_data("stories260K", "stories260K.bin")
    text = need_data("tinystories", "valid-snippet.txt")
    calib = DATA / "tinystories" / "train-head.txt"
    logs = []
    kw = dict(model=str(STORIES), text=str(text), calib=str(calib), recipes=["w4-rtn-sym"], peers=["ort-rtn-sym"],
              out=tmp_path, max_tokens=4096, log=logs.append)
    rep = bench_quality(**kw)
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["fp32", "w4-rtn-sym", "ort-rtn-sym"]
    fp, ours, ort = rows["fp32"], rows["w4-rtn-sym"], rows["ort-rtn-sym"]
    # FP on these 8 windows, and int4 RTN of both tools a little worse (measured 5.46, 6.63, 6.23)
    assert 5 < fp["ppl"] < 6.5 and fp["delta_ppl"] == 0
    for r in (ours, ort):
        assert fp["ppl"] < r["ppl"] < 1.5 * fp["ppl"] and r["delta_ppl"] == pytest.approx(r["ppl"] - fp["ppl"])
    # int4 + one scale per group of 128 (measured 4.23); onnxruntime pads K=64 and 172 to whole blocks
    # of 128 and stores fp32 scales (measured 7.97)
    assert 4.1 < ours["bits_per_weight"] < 4.3 and ort["bits_per_weight"] > 4.3
    assert "onnxruntime" in ort["versions"] and ours["pipeline"].startswith("fold-norms,quantize-weights")
    md = (tmp_path / "quality.md").read_text()
    assert md == markdown(rep) and "| ort-rtn-sym | peer |" in md
    assert json.loads((tmp_path / "quality.json").read_text())["rows"][1]["name"] == "w4-rtn-sym"
    # a second run keeps every row it already has
    logs.clear()
    again = bench_quality(**kw)
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in rep["rows"]]
    assert sum("kept from an earlier run" in m for m in logs) == 3


def test_bench_quality_gguf_rows_beside_llama_cpps_quantizer(tmp_path):
    """--gguf: each recipe's GGUF in llama.cpp, where its grid is a GGUF type (skipped with the
    reason where not), beside llama.cpp's own Q4_0 of the same float weights, all on lowbit's tokens."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lowbit[llamacpp]')")
    import torch
    from models import tiny_hf_dir
    tiny_hf_dir(tmp_path / "m", "llama", torch.float32)
    text = tmp_path / "t.txt"
    text.write_text("the lazy dog jumps over the quick brown fox " * 60)
    rep = bench_quality(str(tmp_path / "m"), str(text), str(text), ["gguf-q4_0", "w4-rtn"], ["llamacpp-q4_0"],
                        tmp_path / "b", ctx=64, max_tokens=1024, gguf=True, log=lambda m: None)
    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == ["fp32", "gguf-q4_0", "gguf-q4_0 (llama.cpp)", "w4-rtn", "w4-rtn (llama.cpp)", "llamacpp-q4_0"]
    assert "integer zero points" in rows["w4-rtn (llama.cpp)"]["skipped"]   # group 128, asymmetric: no GGUF type
    ours, lcpp = rows["gguf-q4_0 (llama.cpp)"], rows["llamacpp-q4_0"]
    assert ours["bits_per_weight"] == lcpp["bits_per_weight"] == 4.5   # Q4_0: 18 bytes per 32 weights
    # the GGUF runs what the artifact computes, up to llama.cpp's 8-bit activations (measured 0.1%)
    assert abs(ours["ppl"] / rows["gguf-q4_0"]["ppl"] - 1) < 0.01
    # random weights: every row near the vocabulary's 256 (no quality claim), sizes from the files
    assert abs(lcpp["ppl"] / rows["fp32"]["ppl"] - 1) < 0.1 and lcpp["size_mib"] > 0 and ours["size_mib"] > 0


def test_bench_quality_names_unknown_rows(tmp_path):
    with pytest.raises(LowbitError, match="unknown recipe.*nope"):
        bench_quality("x", "t", "c", ["nope"], [], tmp_path)
    with pytest.raises(LowbitError, match="unknown peer.*gguf"):
        bench_quality("x", "t", "c", [], ["gguf"], tmp_path)


def test_bench_decode_rows(tmp_path, monkeypatch):
    """Real exports and onnxruntime sessions on stories260K; speeds are printed, not asserted."""
    from lowbit.tools.bench import bench_decode, decode_markdown
    from lowbit.tools import api
    need_data("stories260K", "stories260K.bin")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    api.compile(str(STORIES), passes="quantize-weights{bits=4,group=32,lm_head=true}", out=tmp_path / "art", progress=False)
    rep = bench_decode([str(tmp_path / "art")], str(STORIES), tmp_path / "out", accuracy_levels=(4,),
                       prompt_tokens=16, new_tokens=8, repeats=1, threads=1, log=lambda m: None)
    rows = {r["row"]: r for r in rep["rows"]}
    genai = importlib.util.find_spec("onnxruntime_genai") is not None
    # no GGUF for this model, and its MLP's K = 172 has no GGUF grid: no llama.cpp row, and the reason
    assert set(rows) == {"fp32", "art (ort, acc 4)"} | ({"art (onnxruntime-genai)"} if genai else set())
    assert "K = 172" in rep["skipped"]["art (llama.cpp)"]
    assert rows["fp32"]["decode_vs_fp32"] == 1.0 and all(r["decode_tok_s"] > 0 for r in rows.values())
    assert (tmp_path / "out" / "decode.md").read_text() == decode_markdown(rep)
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 2   # exports cached for the next run


def test_peer_without_its_environment_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """llm-compressor's and GPTQModel's pins conflict with lowbit's: each runs from its own Python,
    and without one the row says how to make it."""
    need_data("stories260K", "stories260K.bin")
    text = need_data("tinystories", "valid-snippet.txt")
    monkeypatch.delenv("LOWBIT_LLMCOMPRESSOR_PYTHON", raising=False)
    monkeypatch.delenv("LOWBIT_GPTQMODEL_PYTHON", raising=False)
    rep = bench_quality(str(STORIES), str(text), str(text), [], ["llmcompressor-gptq-g64", "gptqmodel-g64"], tmp_path,
                        max_tokens=1024, log=lambda m: None)
    lc, gq = rep["rows"][1:]
    assert lc["ppl"] is None and "LOWBIT_LLMCOMPRESSOR_PYTHON" in lc["skipped"]
    assert gq["ppl"] is None and "LOWBIT_GPTQMODEL_PYTHON" in gq["skipped"]
    assert "| skipped |" in markdown(rep) and "(llm-compressor pins" in markdown(rep)


def test_bench_scale_rows_and_resume(tmp_path, monkeypatch):
    """`lowbit bench scale` on a tiny Llama shape: a random bf16 checkpoint with as many parameters as
    transformers makes of its config, each compile in a child process (left on disk: budget 1000
    bytes) with its time and its own peak memory (not this process's: it peaks at 2 GiB first),
    the artifacts loadable, rows kept on a rerun."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowbit.ir.artifact import load_artifact, read_manifest
    from lowbit.tools import bench_scale as bs
    monkeypatch.setitem(bs.SHAPES, "tiny", (64, 128, 2, 4, 2))
    torch.ones(2 << 30, dtype=torch.uint8).add_(1)   # 2 GiB resident, then freed: this process's peak
    logs = []
    rep = bs.bench_scale(tmp_path, ["tiny"], ["rtn", "gptq"], samples=2, max_memory=1000, log=logs.append)
    ckpt = tmp_path / "models" / "tiny"
    params = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt)).num_parameters()
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"BF16"}
    assert [(r["method"], r["blocks"]) for r in rep["rows"]] == [("rtn", 2), ("gptq", 2)]
    for r in rep["rows"]:
        assert r["params_b"] == round(params / 1e9, 3) and r["seconds"] > 0
        assert 0.1 < r["peak_rss_gb"] < 1.5   # a child process with torch loaded, a tiny model
        art = tmp_path / "artifacts" / f"tiny-{r['method']}"
        assert read_manifest(art)["pipeline"] == r["key"]["pipeline"]
        x = torch.randint(0, 1000, (1, 8))
        assert torch.isfinite(load_artifact(art)(x)).all()
    assert (tmp_path / "scale.md").read_text() == bs.scale_table(rep) and rep["device"] == "cpu"
    logs.clear()
    again = bs.bench_scale(tmp_path, ["tiny"], ["rtn", "gptq"], samples=2, max_memory=1000, log=logs.append)
    assert again["rows"] == rep["rows"] and sum("kept from an earlier run" in m for m in logs) == 2
    with pytest.raises(LowbitError, match="--device tpu"):
        bs.bench_scale(tmp_path, ["tiny"], ["rtn"], max_memory=1000, device="tpu")
    with pytest.raises(LowbitError, match="unknown shape or method 13b"):
        bs.bench_scale(tmp_path, ["13b"], ["rtn"])
