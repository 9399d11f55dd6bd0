import json
import re

import pytest
import torch

from lowbit.ir.artifact import load_artifact, save_artifact
from lowbit.ir.errors import LowbitError
from lowbit.ir.printer import format_ir
from lowbit.passes import PassManager
from lowbit.tools.report import artifact_storage, storage
from models import DATA, need_data, run_cli


def test_round_trip_exact(stories_ir, tmp_path):
    PassManager("fold-norms,quantize-weights{bits=4,group=32,sym=false}").run(stories_ir)
    save_artifact(stories_ir, tmp_path / "a", {"seed": 0})
    back = load_artifact(tmp_path / "a")
    x = torch.randint(0, 512, (2, 40))
    assert torch.equal(back(x), stories_ir(x))
    assert format_ir(back) == format_ir(stories_ir)
    assert back.tokenizer.encode("Once upon a time") == stories_ir.tokenizer.encode("Once upon a time")
    assert artifact_storage(tmp_path / "a") == storage(stories_ir)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["pipeline"] == "fold-norms,quantize-weights{bits=4,group=32,sym=false}"
    assert [p["pass"] for p in man["passes"]] == ["fold-norms", "quantize-weights{bits=4,group=32,sym=false}"]


def test_interrupted_save_leaves_nothing(stories_ir, tmp_path, monkeypatch):
    import lowbit.ir.artifact as art

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(art, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(stories_ir, tmp_path / "a", {})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_detects_corruption(stories_ir, tmp_path):
    save_artifact(stories_ir, tmp_path / "a", {})
    with pytest.raises(LowbitError, match="exists and is not empty"):
        save_artifact(stories_ir, tmp_path / "a", {})
    (tmp_path / "a" / "weights.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(LowbitError, match="corrupt artifact"):
        load_artifact(tmp_path / "a")


# -- loading never runs code from the artifact --------------------------------------------------------
@pytest.fixture(scope="module")
def clean_artifact(tmp_path_factory, _stories_captured):
    import copy
    ir = copy.deepcopy(_stories_captured)
    PassManager("fold-norms,quantize-weights{bits=4,group=32,sym=false}").run(ir)
    out = tmp_path_factory.mktemp("art") / "a"
    save_artifact(ir, out, {"seed": 0})
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _nodes(path):
    return json.loads((path / "graph.json").read_text())


def _write(path, nodes):
    (path / "graph.json").write_text(json.dumps(nodes))


def _inject(nodes, call: dict, pick_logits: bool = True):
    """The attack from the report: a call node before the output, and a getitem that picks the logits
    out of a tuple holding both, so the graph still returns logits."""
    out = nodes[-1]
    logits = out["args"]["list"][0]
    evil = {"name": "evil", "op": "call_function", "kwargs": {}, "meta": {}, **call}
    nodes.insert(-1, evil)
    if pick_logits:
        nodes.insert(-1, {"name": "pick", "op": "call_function", "target": "_operator.getitem",
                          "args": {"list": [{"tuple": [logits, {"node": "evil"}]}, 0]}, "kwargs": {}, "meta": {}})
        out["args"] = {"list": [{"node": "pick"}]}
    return nodes


@pytest.mark.parametrize("call,match", [
    ({"target": "builtins.exec", "args": {"list": ["open({sentinel!r}, 'w').write('ran')"]}}, "calls builtins.exec"),
    ({"target": "builtins.eval", "args": {"list": ["open({sentinel!r}, 'w').write('ran')"]}}, "calls builtins.eval"),
    ({"target": "builtins.__import__", "args": {"list": ["os"]}}, "calls builtins.__import__"),
    ({"target": "builtins.getattr", "args": {"list": [{"node": "input_ids"}, "__class__"]}}, "calls builtins.getattr"),
    ({"target": "operator.methodcaller", "args": {"list": ["system", "touch {sentinel}"]}}, "calls operator.methodcaller"),
    ({"target": "_operator.attrgetter", "args": {"list": ["__globals__"]}}, "calls _operator.attrgetter"),
    ({"target": "torch.ops.evil.op.default", "args": {"list": []}}, "calls torch.ops.evil.op.default"),
    ({"target": "torch.ops.aten.as_strided.default", "args": {"list": [{"node": "input_ids"}, {"list": [9999]}, {"list": [1]}]}},
     "calls torch.ops.aten.as_strided.default"),
    ({"target": "torch.ops.aten.add", "args": {"list": []}}, "calls torch.ops.aten.add,"),
    ({"target": "torch.ops.aten.add.__class__", "args": {"list": []}}, "not an op lowbit loads"),
    ({"target": "torch.ops.aten.add.Tensor", "name": "x = open({sentinel!r}, 'w').write('ran')  #",
      "args": {"list": [1, 2]}}, "node name .* is not a plain identifier"),
    ({"target": "torch.ops.aten.add.Tensor", "name": "torch", "args": {"list": [1, 2]}}, "node name 'torch' is reserved"),
    ({"target": "torch.ops.aten.add.Tensor", "args": {"list": [1, 2]},
      "kwargs": {"alpha=open({sentinel!r}, 'w').write('ran'), x": 1}}, "keyword .* is not a plain identifier"),
    ({"target": "torch.ops.aten.zeros.default", "args": {"list": [{"list": [1]}]}, "kwargs": {"dtype": {"dtype": "load"}}},
     "argument dtype='load' is not a value lowbit writes"),
    ({"target": "torch.ops.aten.zeros.default", "args": {"list": [{"list": [1]}]}, "kwargs": {"device": {"device": "cuda; x"}}},
     "argument device="),
    ({"op": "get_attr", "target": "a\"); open({sentinel!r}, 'w').write('ran'); (\"", "args": {"list": []}},
     "tensor name .* is not a dotted path"),
    ({"op": "call_method", "target": "__class__", "args": {"list": [{"node": "input_ids"}]}}, "has op 'call_method'"),
    ({"op": "call_module", "target": "model", "args": {"list": []}}, "has op 'call_module'"),
    ({"target": "torch.ops.aten.add.Tensor", "args": {"list": [{"node": "later"}, 1]}}, "refers to node 'later' before"),
    ({"target": "torch.ops.aten.add.Tensor", "args": {"list": [{"code": "import os"}, 1]}}, "is not a value lowbit writes"),
])
def test_malicious_graphs_are_refused_before_anything_runs(clean_artifact, tmp_path, capsys, call, match):
    need_data("tinystories", "valid-snippet.txt")
    sentinel = tmp_path / "ran.txt"
    art = _copy(clean_artifact, tmp_path / "evil")
    call = json.loads(json.dumps(call).replace("{sentinel!r}", repr(str(sentinel)).replace('"', '\\"'))
                      .replace("{sentinel}", str(sentinel)))
    _write(art, _inject(_nodes(art), call, pick_logits=call.get("op", "call_function") == "call_function"))
    code, _, err = run_cli(capsys, "eval", str(art), "--text", str(DATA / "tinystories" / "valid-snippet.txt"),
                         "--max-tokens", "1024")
    lines = [ln for ln in err.splitlines() if ln.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(match, lines[0]), lines[0]
    assert not sentinel.exists()


def test_tensor_names_and_manifests_that_are_not_what_they_claim(clean_artifact, tmp_path):
    from safetensors.torch import load_file, save_file
    for bad in ("../../evil", "a/b", "layers..0", "__class__", "forward.x", "x y"):
        art = _copy(clean_artifact, tmp_path / f"t{abs(hash(bad))}")
        tensors = load_file(art / "weights.safetensors")
        tensors[bad] = torch.zeros(1)
        save_file(tensors, art / "weights.safetensors")
        with pytest.raises(LowbitError, match="tensor name .* (is not a dotted path|cannot be stored)"):
            load_artifact(art)
    cases = {"manifest.json": ["[]", '{"format": "lowbit-artifact/1"}', "not json",
                               json.dumps({**json.loads((clean_artifact / "manifest.json").read_text()),
                                           "model": {"family": "x", "vocab_size": "512"}})],
             "graph.json": ["{}", "[]", '[{"name": "x"}]', "[1, 2]", "\u0000"]}
    for i, (f, texts) in enumerate(cases.items()):
        for j, text in enumerate(texts):
            art = _copy(clean_artifact, tmp_path / f"m{i}{j}")
            (art / f).write_text(text)
            with pytest.raises(LowbitError, match="manifest|corrupt artifact"):
                load_artifact(art)


def test_a_graph_that_does_not_return_logits_is_refused(clean_artifact, tmp_path):
    art = _copy(clean_artifact, tmp_path / "tuple")
    nodes = _nodes(art)
    logits = nodes[-1]["args"]["list"][0]
    nodes[-1]["args"] = {"list": [{"tuple": [logits, logits]}]}
    _write(art, nodes)
    with pytest.raises(LowbitError, match=r"does not return logits \[batch, seq, 512\]"):
        load_artifact(art)


def test_fuzzed_graphs_load_cleanly_or_run(clean_artifact, tmp_path):
    """Random mutations of a valid graph.json (targets, argument kinds, node order, names): every
    result is a LowbitError at load, or a graph that runs."""
    import random
    rng = random.Random(0)
    base = _nodes(clean_artifact)
    targets = sorted({d["target"] for d in base if d["op"] == "call_function"}) + [
        "builtins.exec", "builtins.open", "operator.attrgetter", "torch.ops.aten.as_strided.default",
        "torch.ops.lowbit.dequantize.default", "torch.ops.aten.neg.default", "_operator.getitem", "os.system"]
    values = [0, -1, 2**40, 1.5, float("nan"), "x", None, True, {"dtype": "float16"}, {"dtype": "load"},
              {"device": "meta"}, {"list": [1, 2]}, {"tuple": []}, {"node": "input_ids"}, {"node": "nope"}, {"bad": 1}]
    art = _copy(clean_artifact, tmp_path / "fuzz")
    outcomes = {"refused": 0, "ran": 0}
    x = torch.randint(0, 512, (1, 7))
    for _ in range(120):
        nodes = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            d = rng.choice(nodes)
            kind = rng.randrange(5)
            if kind == 0 and d["op"] == "call_function":
                d["target"] = rng.choice(targets)
            elif kind == 1 and d["op"] == "call_function" and d["args"]["list"]:
                args = d["args"]["list"]
                args[rng.randrange(len(args))] = rng.choice(values)
            elif kind == 2:
                i, j = rng.randrange(len(nodes)), rng.randrange(len(nodes))
                nodes[i], nodes[j] = nodes[j], nodes[i]
            elif kind == 3:
                d["name"] = rng.choice(["torch", "self", "x-y", "a b", "output", "add", d["name"] + "_2"])
            else:
                d["op"] = rng.choice(["call_function", "get_attr", "placeholder", "output", "call_method"])
        _write(art, nodes)
        try:
            ir = load_artifact(art)
        except LowbitError:
            outcomes["refused"] += 1
            continue
        out = ir(x)   # a graph that loads runs
        assert out.shape == (1, 7, 512)
        outcomes["ran"] += 1
    assert outcomes["refused"] > 50 and sum(outcomes.values()) == 120, outcomes


def test_every_op_of_the_test_families_is_loadable():
    """The allow-list covers what captures of the test families produce (a family whose capture
    needs a new op fails here, not in a user's load)."""
    from lowbit.ir.artifact import _resolve_target, _target_name
    from models import FAMILIES, MORE_FAMILIES, tiny_ir
    for family in FAMILIES + MORE_FAMILIES:
        ir, _ = tiny_ir(family)
        refused = set()
        for n in ir.graph.nodes:
            if n.op == "call_function":
                try:
                    assert _resolve_target(_target_name(n.target)) is n.target, (family, n.target)
                except LowbitError:
                    refused.add(_target_name(n.target))
        assert not refused, (family, refused)


def test_partial_directories_of_killed_compiles_are_removed(stories_ir, tmp_path):
    import os
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".a.partial-{dead.pid}-xyz"
    live = tmp_path / f".a.partial-{os.getpid()}-abc"   # a compile still running: kept
    for p in (stale, live):
        p.mkdir()
        (p / "weights.safetensors").write_bytes(b"half")
    save_artifact(stories_ir, tmp_path / "a", {})
    assert not stale.exists() and live.exists() and (tmp_path / "a" / "graph.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LowbitError, match="exists and is not a directory"):
        save_artifact(stories_ir, tmp_path / "file", {})
