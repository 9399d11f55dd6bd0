"""Models larger than memory: weights left in the checkpoint's files and read when needed, written
tensors spilled to disk, artifacts in shards, and compiles that resume after kill -9. A tiny model
with a budget of a few bytes takes every streamed path; its artifacts must equal the whole-model
ones bit for bit."""
import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lowbit.ir.artifact import weight_files
from lowbit.ir.errors import LowbitError
from lowbit.ir.load import load
from lowbit.passes.recipes import RECIPES
from lowbit.tools import api
from models import DATA, need_data, tiny_hf_dir


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in weight_files(path):
        out.update(load_file(f))
    return out


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16-llama")
    tiny_hf_dir(d, "llama", torch.bfloat16, num_hidden_layers=3)
    return d


def test_weights_stay_on_disk_until_read(bf16_dir):
    lazy, whole = load(str(bf16_dir), max_memory=1000), load(str(bf16_dir))
    assert lazy.stored and not whole.stored
    assert all(lazy.placeholder(t).is_meta for t in lazy.stored)
    w = "model.model.layers.0.self_attn.q_proj.weight"
    assert lazy.tensor(w).dtype == torch.float32 and torch.equal(lazy.tensor(w), whole.tensor(w))
    x = torch.randint(0, 200, (2, 9))
    assert torch.equal(lazy(x), whole(x))   # node by node, each weight read when used


def test_evaluation_streams_too(bf16_dir):
    text = need_data("tinyshakespeare", "input.txt")
    whole = api.evaluate(str(bf16_dir), text, ctx=64, max_tokens=1024, progress=False)
    streamed = api.evaluate(str(bf16_dir), text, ctx=64, max_tokens=1024, progress=False, max_memory=1000)
    assert streamed["ppl"] == whole["ppl"] and whole["tokens"] > 0


@pytest.mark.parametrize("family,recipe", [("llama", "w4-rtn"), ("llama", "w4-gptq"), ("llama", "quarot-w4-gptq"),
                                           ("gpt2", "w4-gptq"), ("qwen2", "w4a8kv8"), ("mixtral", "quarot-w4-gptq"),
                                           ("llama", "squeezellm-w3-sparse"), ("gemma3_text", "squeezellm-w3-sparse"),
                                           ("llama", "LEARNED"), ("qwen2", "LEARNED"), ("gemma3_text", "LEARNED"),
                                           ("llama", "AWQ"), ("llama", "FRONTIER"), ("gpt2", "SHAPE")])
def test_streamed_compile_equals_whole(tmp_path, family, recipe):
    """A budget of 1 kB: every weight is read from the checkpoint when a pass needs it and every
    tensor a pass writes is spilled to disk at once; the artifact is the same, tensor for tensor."""
    calib = need_data("tinyshakespeare", "input.txt")
    tiny_hf_dir(tmp_path / "m", family, torch.bfloat16)
    how = {"recipe": recipe}
    if recipe == "LEARNED":   # w4a4kv4-learned (learn-rotations{loss=local} streams), a few steps on short sequences
        how = {"passes": RECIPES["w4a4kv4-learned"][0].replace("steps=200", "steps=3").replace("seq=256", "seq=32")}
    if recipe == "FRONTIER":   # frontier-w4a4kv4 shortened: shape-noise's walk runs block by block
        how = {"passes": RECIPES["frontier-w4a4kv4"][0].replace("steps=200", "steps=3").replace("seq=256", "seq=32")}
    if recipe == "SHAPE":   # shape-noise on LayerNorm branches and on the keys
        how = {"passes": "fold-norms,fuse-rotations,insert-hadamard,shape-noise,quantize-activations{bits=4},"
                         "quantize-kv{bits=4},quantize-weights{bits=4,group=32}"}
    if recipe == "AWQ":   # scale-channels rewrites norms, values and up projections as its walk reaches them
        how = {"passes": "scale-channels{group=32,sym=true},quantize-weights{method=gptq,bits=4,group=32,sym=true}"}
    whole = api.compile(str(tmp_path / "m"), **how, calib=calib, out=tmp_path / "whole", progress=False)
    streamed = api.compile(str(tmp_path / "m"), **how, calib=calib, out=tmp_path / "new" / "streamed",
                           progress=False, max_memory=1000)
    assert not whole.ir.stored and streamed.ir.stored
    assert _same(tmp_path / "whole", tmp_path / "new" / "streamed")
    if recipe in ("FRONTIER", "SHAPE"):   # shape-noise made its matrices, block by block
        assert sum(k.startswith("shape_noise.") for k in _tensors(tmp_path / "whole")) > 2
    x = torch.randint(0, 200, (1, 7))
    assert torch.equal(whole.ir(x), streamed.ir(x))   # the returned IR reads the artifact's files
    del streamed
    gc.collect()
    assert not list((tmp_path / "new").glob("lowbit-spill-*"))   # removed with the IR


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_rewritten_weights_are_read_once(tmp_path, bf16_dir, monkeypatch, method):
    """fold-norms, fuse-rotations and insert-hadamard leave a weight on disk as a function of it
    (applied when it is read): no rewritten weight goes to the spill files, and each linear's
    weight is read from the checkpoint once, by quantize-weights."""
    from lowbit.ir.store import Spill, Stored
    reads, spilled = [], []
    read, flush = Stored.read, Spill.flush
    monkeypatch.setattr(Stored, "read", lambda self: reads.append(self.key) or read(self))
    monkeypatch.setattr(Spill, "flush", lambda self, ir: spilled.extend(self.pending) or flush(self, ir))
    calib = need_data("tinyshakespeare", "input.txt")
    passes = f"fold-norms,fuse-rotations,insert-hadamard,quantize-weights{{method={method},bits=4,group=32}}"
    api.compile(str(bf16_dir), passes=passes, calib=calib, out=tmp_path / "a", progress=False, max_memory=1000)
    linears = [k for k in load_file(bf16_dir / "model.safetensors") if k.endswith("proj.weight")]
    assert len(linears) == 21 and all(reads.count(k) == 1 for k in linears)
    assert spilled and not [t for t in spilled if t.endswith("proj.weight")]   # only what quantize-weights packed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,recipe,budget", [("llama", "w4-gptq", None), ("llama", "w4-gptq", 1000),
                                                  ("mixtral", "quarot-w4-gptq", None),
                                                  ("llama", "squeezellm-w3-sparse", None)])
def test_gpu_compile_agrees_with_cpu(tmp_path, family, recipe, budget):
    """--device cuda (GPTQ's walk, Hessians and column walk on the GPU): the same tensors, each
    equal (codes) or within fp16 rounding (scales, outlier values) but for the few values the
    float64 sums' other order tips over (at most 1 in 1000), and outputs within 1e-3 of the CPU's."""
    calib = need_data("tinyshakespeare", "input.txt")
    tiny_hf_dir(tmp_path / "m", family, torch.bfloat16)
    cpu = api.compile(str(tmp_path / "m"), recipe, calib=calib, out=tmp_path / "cpu", progress=False, max_memory=budget)
    cuda = api.compile(str(tmp_path / "m"), recipe, calib=calib, out=tmp_path / "cuda", progress=False,
                       max_memory=budget, device="cuda")
    assert cuda.manifest["device"].startswith("cuda")
    ta, tb = _tensors(tmp_path / "cpu"), _tensors(tmp_path / "cuda")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        a, b = ta[k], tb[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        same = torch.isclose(a.float(), b.float(), rtol=2e-3, atol=1e-6) if a.is_floating_point() else a == b
        assert (~same).float().mean() <= 1e-3, k
    x = torch.randint(0, 200, (1, 16))
    ya, yb = cpu.ir(x), cuda.ir(x)
    assert (ya - yb).abs().max() <= 1e-3 * ya.abs().max()


def test_experts_stored_one_by_one_are_stacked_when_read(tmp_path):
    """Mixtral checkpoints store each expert's w1, w2, w3 apart, and transformers stacks them into
    one parameter per stack while loading. Captured without its weights, each stack is made from
    the stored tensors by transformers' own conversion when it is read: what from_pretrained holds."""
    from transformers import AutoModelForCausalLM

    from lowbit.ir.graph import short_name
    tiny_hf_dir(tmp_path, "mixtral", torch.bfloat16)
    ir = load(str(tmp_path), max_memory=1000)
    params = dict(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).named_parameters())
    stacks = {t: ir.stored[t] for t in ir.stored if t.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert sorted(len(s.parts) for s in stacks.values()) == [4, 4, 8, 8]   # 4 experts; w1 and w3 into gate_up
    assert all(torch.equal(ir.tensor(t), params[short_name(t)]) for t in stacks)
    assert all(torch.equal(ir.tensor(t), params[short_name(t)]) for t in ir.stored if "mlp.gate." in t)   # renamed


def test_sharded_artifact_loads(tmp_path, bf16_dir):
    from lowbit.ir.artifact import load_artifact, save_tensors
    ir = load(str(bf16_dir))
    save_tensors(ir, tmp_path, shard_bytes=20_000)
    assert len(weight_files(tmp_path)) > 3
    assert sorted(_tensors(tmp_path)) == sorted(ir.tensor_targets())
    api.compile(str(bf16_dir), "w4-rtn", out=tmp_path / "a", progress=False)
    back = load_artifact(tmp_path / "a")
    assert back.tensor_targets()


def test_whole_model_work_is_refused_by_name(bf16_dir, tmp_path):
    calib = need_data("tinyshakespeare", "input.txt")
    with pytest.raises(LowbitError, match=r"learn-rotations\{loss=ce\} .* needs the whole model in memory"):
        api.compile(str(bf16_dir), "spinquant-w4", calib=calib, out=tmp_path / "a", progress=False, max_memory=1000)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "mixtral", "falcon"])
def test_fisher_block_by_block_equals_whole(tmp_path, family):
    """The Fisher information of a model left on disk, one block at a time (forward sweep, then each
    block rerun from its saved input with its weights as leaves): the same sums, bit for bit."""
    from lowbit.ir.store import Spill
    from lowbit.passes.base import PassContext
    from lowbit.passes.sensitivity import fisher
    tiny_hf_dir(tmp_path / "m", family, torch.bfloat16)
    whole, lazy = load(str(tmp_path / "m")), load(str(tmp_path / "m"), max_memory=1000)
    lazy.spill = Spill(tmp_path / "spill", 250)
    calib = torch.randint(3, 200, (3, 24), generator=torch.Generator().manual_seed(0))
    a, b = fisher(whole, PassContext(calib=calib), 3), fisher(lazy, PassContext(calib=calib), 3)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_scratch_of_killed_compiles_is_removed(tmp_path, monkeypatch):
    """A compile killed with kill -9 leaves its spill files beside the output and learn-rotations'
    recorded values in the temporary directory; the next compile removes them, but not those of a
    process still running, and removes its own."""
    import tempfile
    dead = subprocess.Popen(["true"])
    dead.wait()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    stale = [tmp_path / "out" / f"lowbit-spill-{dead.pid}-x", tmp_path / "tmp" / f"lowbit-learn-{dead.pid}-y"]
    live = tmp_path / "tmp" / f"lowbit-learn-{os.getpid()}-z"
    for p in (*stale, live):
        p.mkdir(parents=True)
        (p / "rows.bin").write_bytes(b"half")
    tiny_hf_dir(tmp_path / "m", "llama", torch.bfloat16)
    passes = RECIPES["w4a4kv4-learned"][0].replace("steps=200", "steps=2").replace("seq=256", "seq=32")
    api.compile(str(tmp_path / "m"), passes=passes, calib=need_data("tinyshakespeare", "input.txt"),
                out=tmp_path / "out" / "a", progress=False, max_memory=1000)
    assert not any(p.exists() for p in stale) and live.exists()
    assert list((tmp_path / "tmp").glob("lowbit-*")) == [live]


def test_killed_compile_resumes_to_the_same_artifact(tmp_path):
    """kill -9 once a few linears are finished; the same command resumes, reuses the finished ones
    (the manifest counts them) and writes the artifact an uninterrupted compile writes."""
    calib = need_data("tinyshakespeare", "input.txt")
    tiny_hf_dir(tmp_path / "m", "llama", torch.bfloat16, num_hidden_layers=12, hidden_size=128, intermediate_size=256)
    cmd = [sys.executable, "-m", "lowbit.tools.cli", "compile", str(tmp_path / "m"), "--recipe", "w4-gptq",
           "--calib", str(calib), "--out", str(tmp_path / "resumed")]
    records = tmp_path / ".resumed.resume" / "01-quantize-weights"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(records.glob("*.safetensors"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(records.glob("*.safetensors")))
    assert 5 <= kept < 12 * 7, "the compile was not killed mid-way"
    assert not (tmp_path / "resumed").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr
    api.compile(str(tmp_path / "m"), "w4-gptq", calib=calib, out=tmp_path / "straight", progress=False)
    assert _same(tmp_path / "resumed", tmp_path / "straight")
    assert not (tmp_path / ".resumed.resume").exists()
    stats = json.loads((tmp_path / "resumed" / "manifest.json").read_text())["passes"][0]
    assert stats["resumed_linears"] == kept and stats["linears"] == 12 * 7


def test_two_processes_agree_with_one(tmp_path):
    """torchrun with two processes on the CPU (gloo): each calibrates on half of the windows and the
    Hessians are summed; each quantizes its share of the linears sharing a Hessian and sends them
    to the other. The artifact equals the one-process artifact (here bit for bit: H differs at most
    by the order of a float sum, which flips no rounding on this model)."""
    calib = need_data("tinyshakespeare", "input.txt")
    tiny_hf_dir(tmp_path / "m", "llama", torch.bfloat16)
    api.compile(str(tmp_path / "m"), "w4-gptq", calib=calib, out=tmp_path / "one", progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                           "lowbit.tools.cli", "compile", str(tmp_path / "m"), "--recipe", "w4-gptq", "--calib",
                           str(calib), "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                          start_new_session=True)   # torchrun signals its process group when it ends
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "lowbit" in line)
    assert _same(tmp_path / "one", tmp_path / "two")
    # GPTQ's linears were divided: the processes take turns, q, k, v of a shared Hessian at once
    shares = json.loads((tmp_path / "two" / "manifest.json").read_text())["passes"][0]["linears_per_process"]
    assert shares == [7, 7]
