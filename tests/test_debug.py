"""Debugging tools: `only=` on every pass, `debug compare` (tap by tap, torch and onnxruntime),
`debug bisect` (first breaking pass and application), on a tiny Llama with a pass that corrupts
one linear (registered for these tests only)."""
from dataclasses import dataclass

import pytest
import torch

from lowbit.ir.errors import LowbitError
from lowbit.passes import PassManager
from lowbit.passes.base import REGISTRY, Exact, Pass, PassResult, register
from lowbit.passes.pipeline import PipelineError, parse_pipeline, print_pipeline
from lowbit.tools import api, debug
from models import run_cli, tiny_hf_dir, tiny_ir

BROKEN = "layers.1.mlp.down_proj"


@pytest.fixture
def corrupt_pass():
    """corrupt-linear{name=...}: visits every linear (its applications), negates and triples one."""
    @dataclass(frozen=True)
    class Config:
        name: str = ""

    class CorruptLinear(Pass):
        """Test only: multiply one linear's weight by -3."""
        name = "corrupt-linear"

        def contract(self):
            return Exact()

        def run(self, ir, ctx):
            hit = False
            for lin in list(ir.linears.linears.values()):
                if ctx.applies(lin.path) and lin.path == self.config.name:
                    ir.set_tensor(lin.weight, ir.tensor(lin.weight) * -3)
                    hit = True
            if hit:
                ir.changed()
            return PassResult(hit)
    CorruptLinear.Config = Config
    register(CorruptLinear)
    yield
    REGISTRY.pop("corrupt-linear")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("debug")
    tiny_hf_dir(d / "m", "llama", torch.float32)
    text = d / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 80)
    return d, text


def test_only_restricts_a_pass_to_the_applications_it_names():
    text = "quantize-weights{bits=8,only=layers.0.*|lm_head},quantize-weights{bits=4,group=32}"
    entries = parse_pipeline(text)
    assert print_pipeline(entries) == text and entries[0].only == "layers.0.*|lm_head"
    ir, _ = tiny_ir("llama")
    PassManager(text).run(ir)
    bits = {lin.path: lin.node.meta["lowbit_quant"]["bits"] for lin in ir.linears.linears.values() if lin.quantized}
    assert {p for p, b in bits.items() if b == 8} == {p for p in bits if p.startswith("layers.0.")}
    assert {p for p, b in bits.items() if b == 4} == {p for p in bits if p.startswith("layers.1.")}
    assert ir.stats[0]["applied"] == [p for p in bits if p.startswith("layers.0.")]   # lm_head: not quantized
    with pytest.raises(PipelineError, match="only= needs"):
        parse_pipeline("fold-norms{only=}")


def test_every_pass_names_its_applications():
    """fuse-rotations and insert-hadamard restricted to some layers stay exact (the rest is the identity)."""
    ir, _ = tiny_ir("llama")
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = ir(x)
    PassManager("fold-norms,fuse-rotations{only=R1|R2 layer 1},insert-hadamard{only=R4 layer 0}").run(ir)
    assert [s["applied"] for s in ir.stats[1:]] == [["R1", "R2 layer 1"], ["R4 layer 0"]]
    assert (ir(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ir.stats[1]["r2_layers"] == 1 and ir.stats[2]["r4"] == 1 and ir.stats[2]["r3"] == 0


def test_compare_names_the_broken_linear(tiny, corrupt_pass, tmp_path):
    d, text = tiny
    api.compile(str(d / "m"), passes=f"fold-norms,corrupt-linear{{name={BROKEN}}}", out=tmp_path / "a", progress=False)
    rep = debug.compare(str(d / "m"), str(tmp_path / "a"), text=text, save_inputs=tmp_path / "in.safetensors",
                        windows=2, ctx=32, min_sqnr=30)
    rows = {r["name"]: r for r in rep["rows"]}
    assert rep["first_crossing"]["name"] == rep["worst"]["name"] == BROKEN and "put through fold-norms" in rep["notes"][0]
    assert all(rows[f"layers.{i}.{n}"]["sqnr_db"] is None or rows[f"layers.{i}.{n}"]["sqnr_db"] > 100   # exact
               for i, n in ((0, "mlp.down_proj"), (1, "self_attn.o_proj")))
    assert rows[BROKEN]["sqnr_db"] < 0 and rows[BROKEN]["cosine"] < 0   # -3 W: the opposite direction
    assert rows["logits"]["sqnr_db"] < 30
    # the same inputs again, from the file
    again = debug.compare(str(d / "m"), str(tmp_path / "a"), inputs=tmp_path / "in.safetensors", min_sqnr=30)
    assert [r.get("sqnr_db") for r in again["rows"]] == [r.get("sqnr_db") for r in rep["rows"]]
    md = debug.markdown(rep)
    assert f"first below 30 dB: {BROKEN}" in md and "| block 3 (layer 1 mlp) | block |" in md


def test_compare_torch_and_onnxruntime_lists_every_tap(tiny, tmp_path, capsys):
    d, text = tiny
    art = tmp_path / "q"
    api.compile(str(d / "m"), passes="fold-norms,fuse-rotations,quantize-weights{bits=4,group=32}", out=art,
                progress=False)
    code, out, err = run_cli(capsys, "debug", "compare", str(art), str(art), "--b-backend", "ort", "--text", str(text),
                             "--ctx", "32", "--json")
    assert code == 0, err
    import json
    rep = json.loads(out)
    kinds = [r["kind"] for r in rep["rows"]]
    assert kinds.count("block") == 4 and kinds.count("linear") >= 14 and kinds[-1] == "logits"
    # every linear and block onnxruntime holds, within int8-activation error (accuracy level 4)
    assert not [r for r in rep["rows"] if "missing" in r]   # every tap found in onnxruntime's outputs (lm_head: logits)
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 25 for r in rep["rows"])
    assert rep["onnxruntime"] and isinstance(rep["fused_by_onnxruntime"], dict)
    assert "onnxruntime" in debug.markdown(rep).split("| logits |")[1]   # what it fused, or that it fused none


def test_kernel_ops_keep_every_tap(tiny, tmp_path):
    """The artifact lowered to the CUDA plugins' ops (run here by their PyTorch implementations) still
    holds every tap by its handle, and agrees with the reference runtime."""
    d, text = tiny
    art = tmp_path / "q"
    api.compile(str(d / "m"), passes="fold-norms,fuse-rotations,insert-hadamard,quantize-weights{bits=4,group=32}",
                out=art, progress=False)
    ir = api.load(str(art))
    taps, _ = debug.taps_of(ir)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = debug.record_torch(ir, ids, [t.handle for t in taps])
    low = debug.record_kernels(ir, ids, [t.handle for t in taps], device="cpu")
    assert set(low) == set(ref) == {t.handle for t in taps} and len(taps) >= 19
    assert all(debug.metrics(ref[h], low[h])["sqnr_db"] is None or debug.metrics(ref[h], low[h])["sqnr_db"] > 60
               for h in ref)
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA device"):
            debug.open_side(str(art), "cuda", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compare_torch_and_cuda_kernels(tiny, tmp_path):
    d, text = tiny
    art = tmp_path / "q"
    api.compile(str(d / "m"), passes="fold-norms,fuse-rotations,insert-hadamard,quantize-weights{bits=4,group=32}",
                out=art, progress=False)
    rep = debug.compare(str(art), str(art), text=text, ctx=32, b_backend="cuda")
    assert not [r for r in rep["rows"] if "missing" in r] and not rep["nonfinite"]
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 25 for r in rep["rows"])   # fp16 kernels against float32


def test_bisect_names_the_pass_and_the_linear(tiny, corrupt_pass):
    d, text = tiny
    pipeline = f"fold-norms,corrupt-linear{{name={BROKEN}}},quantize-weights{{bits=8}}"
    rep = debug.bisect(str(d / "m"), pipeline, text=text, min_sqnr=20, ctx=32, max_tokens=128)
    assert rep["found"] and rep["pass_index"] == 2 and rep["pass"] == f"corrupt-linear{{name={BROKEN}}}"
    assert rep["culprit"] == BROKEN and rep["culprit_index"] == 14   # its 14th linear, in graph order
    assert rep["smallest_pipeline"] == f"corrupt-linear{{name={BROKEN},only={BROKEN}}}" and rep["smallest_shows_it"]
    ok = debug.bisect(str(d / "m"), "fold-norms,quantize-weights{bits=8}", text=text, min_sqnr=20, ctx=32, max_tokens=128)
    assert not ok["found"]
    with pytest.raises(LowbitError, match="give a criterion"):
        debug.bisect(str(d / "m"), "fold-norms", text=text, ctx=32, max_tokens=128)


def test_a_broken_contract_leaves_a_reproducer(tiny, corrupt_pass, tmp_path, capsys):
    """compile --diff: corrupt-linear breaks its exact contract; the compile names the reproducer,
    and `lowbit debug repro` reruns that pass on the IR before it and fails the same way."""
    d, text = tiny
    out = tmp_path / "a"
    code, _, err = run_cli(capsys, "compile", str(d / "m"), "--passes", f"fold-norms,corrupt-linear{{name={BROKEN}}}",
                           "--out", str(out), "--diff", "--dump-ir", str(tmp_path / "ir"), "--dump-ir-tree",
                           "--dump-ir-changed")
    assert code == 2 and "broke its exact contract" in err and f"{out}.repro" in err and not out.exists()
    spec = (tmp_path / "a.repro" / "repro.json").read_text()
    assert "corrupt-linear" in spec and (tmp_path / "a.repro" / "before" / "manifest.json").exists()
    code, got, _ = run_cli(capsys, "debug", "repro", str(tmp_path / "a.repro"))
    assert code == 1 and "reproduced: pass 'corrupt-linear" in got and "broke its exact contract" in got
    # the tree dump: the input, then each pass that changed the IR (the broken one too) with its diff and stats
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["00-input", "01-fold-norms", "02-corrupt-linear"]
    assert "+" in (tmp_path / "ir" / "01-fold-norms" / "diff.txt").read_text()
    assert '"folded"' in (tmp_path / "ir" / "01-fold-norms" / "stats.json").read_text()


def test_precision_fills_a_size_with_the_most_sensitive_linears(tiny):
    d, text = tiny
    rep = debug.precision(str(d / "m"), passes="fold-norms,quantize-weights{method=rtn,bits=3,group=32,sym=false}",
                          text=text, calib=text, max_bpw=3.9, samples=2, ctx=32, max_tokens=256)
    low, mixed = rep["tried"]
    assert low["promoted"] == 0 and 0 < mixed["promoted"] < 14 and low["bits_per_weight"] < mixed["bits_per_weight"] <= 3.9
    assert rep["pipeline"].startswith("fold-norms,quantize-weights{method=rtn,bits=4,group=32,sym=false,only=")
    assert rep["pipeline"].endswith(",quantize-weights{method=rtn,bits=3,group=32,sym=false}")
    assert len(rep["promoted"]) == mixed["promoted"] and "chosen:" in debug.precision_markdown(rep)
    with pytest.raises(LowbitError, match="more than 3.1"):
        debug.precision(str(d / "m"), passes="quantize-weights{method=rtn,bits=3,group=32,sym=false}", text=text,
                        calib=text, max_bpw=3.1, samples=2, ctx=32, max_tokens=256)
