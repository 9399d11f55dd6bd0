"""GGUF files (`lowbit export --format gguf`): lowbit's codes and scales (and minima) written as
Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 blocks (read back with the gguf package's reference: the same weights), and run by llama.cpp
itself (llama-cpp-python, when installed): its logits are the artifact's, up to llama.cpp's 8-bit
activations."""
import numpy as np
import pytest
import torch

from lowbit.ir.errors import LowbitError
from lowbit.ir.load import load
from lowbit.tools import api
from models import STORIES, need_data, tiny_hf_dir

ROTATED_GPTQ = "fold-norms,fuse-rotations{kind=hadamard},quantize-weights{method=gptq,group=32,%s}"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    tiny_hf_dir(d / "m", "llama", torch.float32)
    calib = d / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 100)
    return d, calib


@pytest.mark.parametrize("grid,qtype", [("bits=4,sym=true", "Q4_0"), ("bits=4,sym=true,offset=signed", "Q4_0"),
                                        ("bits=4,sym=false,offset=min", "Q4_1"),
                                        ("bits=5,sym=true", "Q5_0"), ("bits=5,sym=false,offset=min", "Q5_1"),
                                        ("bits=8,sym=true", "Q8_0")])
def test_rotated_gptq_weights_are_written_as_they_are(tiny_llama, grid, qtype):
    import gguf
    d, calib = tiny_llama
    art = d / grid.replace("=", "-").replace(",", "_")
    api.compile(str(d / "m"), passes=ROTATED_GPTQ % grid, calib=calib, out=art, progress=False)
    path = api.export(str(art), d / f"{art.name}.gguf", format="gguf")
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "llama"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == qtype
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"   # fold-norms untied lm_head
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lowbit[llamacpp]')")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = torch.randint(3, 200, (24,), generator=torch.Generator().manual_seed(0))
    llm.eval(ids.tolist())
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    ref = load(str(art))(ids[None])[0]
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < 0.02, err   # llama.cpp multiplies with 8-bit activations: measured 7e-3 (Q4_0), 6e-3 (Q8_0)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    # the file is an input of `lowbit eval` and `lowbit run` (in llama.cpp)
    res = api.evaluate(str(path), calib, ctx=64, max_tokens=1024, tokenizer=str(art / "tokenizer"), progress=False)
    want = api.evaluate(str(art), calib, ctx=64, max_tokens=1024, progress=False)
    assert res["backend"] == "gguf" and abs(res["ppl"] / want["ppl"] - 1) < 0.005   # measured 0.02%
    new = api.run(str(path), "the quick", max_new_tokens=5, tokenizer=str(art / "tokenizer"))
    assert new["backend"] == "gguf" and 1 <= len(new["ids"]) <= 5   # fewer where it reaches the end-of-text token


@pytest.mark.parametrize("passes,why", [
    ("quantize-weights{bits=4,group=32,sym=false}", "integer zero points"),
    ("quantize-weights{bits=4,group=64,sym=false,offset=min}", "group 64"),
    ("fold-norms,fuse-rotations,insert-hadamard,quantize-weights{bits=4,group=32,sym=true}", "lowbit.hadamard"),
])
def test_other_grids_and_online_transforms_are_refused(tiny_llama, passes, why):
    d, calib = tiny_llama
    api.compile(str(d / "m"), passes=passes, out=d / "r", progress=False, force=True)
    with pytest.raises(LowbitError, match=f"gguf: node '\\w+'.*{why}"):
        api.export(str(d / "r"), d / "r.gguf", format="gguf")


def test_widths_32_does_not_divide_are_refused(tmp_path):
    need_data("stories260K", "stories260K.bin")   # its MLP: K = 172
    api.compile(str(STORIES), passes="quantize-weights{bits=4,group=32,sym=true}", out=tmp_path / "a", progress=False)
    with pytest.raises(LowbitError, match="K = 172"):
        api.export(str(tmp_path / "a"), tmp_path / "a.gguf", format="gguf")


def test_q4_1_grid_recovers_the_default_models_own_weights(_smol_captured):
    """The default model ships as a Q4_1 GGUF: each group of 32 is d q + m with q from 0 to 15.
    Round-to-nearest on the Q4_1 grid (offset=min) finds each group's m and d again and gives
    back every one of its 210 linears bit for bit; the file it exports holds the same blocks."""
    import copy

    from lowbit.passes import PassManager
    ir = copy.deepcopy(_smol_captured)
    before = {lin.node.name: ir.tensor(lin.weight) for lin in ir.linears.linears.values() if lin is not ir.linears.lm_head}
    PassManager("quantize-weights{method=rtn,bits=4,group=32,sym=false,offset=min}").run(ir)
    lins = [lin for lin in ir.linears.linears.values() if lin.quantized]
    assert len(lins) == 210 and all(torch.equal(ir.constant(lin.weight_node), before[lin.node.name]) for lin in lins)


def test_q4_0_tables(tiny_llama, tmp_path):
    """--gguf-float q4_0: the embedding and the untied output projection as Q4_0, rounded as
    llama.cpp's quantizer rounds them (the gguf package's reference)."""
    import gguf
    import numpy as np
    d, calib = tiny_llama
    art = tmp_path / "a"
    api.compile(str(d / "m"), passes=ROTATED_GPTQ % "bits=4,sym=true", calib=calib, out=art, progress=False)
    small = {t.name: t for t in gguf.GGUFReader(api.export(str(art), tmp_path / "t.gguf", format="gguf",
                                                           gguf_float="q4_0")).tensors}
    exact = {t.name: t for t in gguf.GGUFReader(api.export(str(art), tmp_path / "f.gguf", format="gguf",
                                                           gguf_float="f32")).tensors}
    q4 = gguf.GGMLQuantizationType.Q4_0
    for name in ("token_embd.weight", "output.weight"):
        assert small[name].tensor_type is q4
        assert np.array_equal(np.asarray(small[name].data), gguf.quants.quantize(np.asarray(exact[name].data), q4))


def test_q4_0_recipe_keeps_a_tied_head_tied(tmp_path):
    """`gguf-q4_0` (channel scales, then GPTQ on Q4_0's grid) leaves norms in place and the output
    projection tied: the file holds exactly the tensors, types and bytes of llama.cpp's own Q4_0 of
    the same model, and llama.cpp runs it as the artifact computes."""
    import gguf

    from lowbit.passes import RECIPES
    tiny_hf_dir(tmp_path / "m", "llama", torch.float32, tie_word_embeddings=True)
    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog " * 100)
    art = tmp_path / "a"
    res = api.compile(str(tmp_path / "m"), "gguf-q4_0", calib=calib, out=art, progress=False)
    assert res.ir.analysis.tied_embedding
    scaled = next(s for s in res.ir.stats if s["pass"].startswith("scale-channels"))
    assert scaled["modified"] and scaled["grid"] == "QuantSpec(bits=4, group=32, sym=True, offset='signed')"
    ours = gguf.GGUFReader(api.export(str(art), tmp_path / "a.gguf", format="gguf"))
    types = {t.name: t.tensor_type.name for t in ours.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "Q8_0"
    assert {types[n] for n in types if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n} == {"Q4_0"}
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lowbit[llamacpp]')")
    api.compile(str(tmp_path / "m"), passes="split-outliers{fraction=0,sensitive=0}", out=tmp_path / "f", progress=False)
    f32 = api.export(str(tmp_path / "f"), tmp_path / "f32.gguf", format="gguf", gguf_float="f32")
    theirs = tmp_path / "q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    theirs = gguf.GGUFReader(theirs)
    assert types == {t.name: t.tensor_type.name for t in theirs.tensors}
    assert sum(t.n_bytes for t in ours.tensors) == sum(t.n_bytes for t in theirs.tensors)   # the headers differ a little
