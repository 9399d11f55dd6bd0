"""Pipeline text, the pass manager's errors, and each instrument."""
from dataclasses import dataclass

import pytest
import torch

from lowbit.ir import meta
from lowbit.ir.errors import LowbitError
from lowbit.passes import RECIPES, PassContext, PassManager, PipelineError, parse_pipeline, print_pipeline
from lowbit.passes.base import REGISTRY, Exact, Pass, PassResult
from lowbit.passes.instruments import DumpIR, NumericDiff, Provenance, Timing, Verify
from models import tiny_ir

aten = torch.ops.aten


@pytest.mark.parametrize("text", [
    "fold-norms",
    "fold-norms,quantize-weights{method=rtn,bits=4,group=128,sym=true}",
    "quantize-weights{bits=3,group=-1,sym=false,clip=true}",
    "quantize-weights{group=32,lm_head=true,bits=8}",
    *[r[0] for r in RECIPES.values()],
])
def test_round_trip(text):
    entries = parse_pipeline(text)
    assert print_pipeline(entries) == text
    assert print_pipeline(parse_pipeline(print_pipeline(entries))) == text


@pytest.mark.parametrize("text,match", [
    ("fold-norm", "unknown pass 'fold-norm'"),
    ("quantize-weights{bitz=4}", "no option 'bitz'"),
    ("quantize-weights{bits=four}", "bits=four"),
    ("quantize-weights{bits=9}", "bits must be in 2..8"),
    ("quantize-weights{sym=yes}", "expected true or false"),
    ("quantize-weights{method=awq}", "method 'awq' is not available"),
    ("quantize-weights{bits=4,bits=3}", "given twice"),
    ("quantize-weights{bits=4", "unbalanced"),
    ("", "empty pipeline"),
])
def test_parse_errors(text, match):
    with pytest.raises(PipelineError, match=match):
        parse_pipeline(text)


class _TestPass(Pass):
    """Test-only passes: no options, an exact contract."""

    @dataclass(frozen=True)
    class Config:
        pass

    def contract(self):
        return Exact(1e-4)


class _BreakExact(_TestPass):
    """Test-only: scales one weight but claims to be exact."""
    name = "test-break-exact"

    def run(self, ir, ctx):
        lin = next(iter(ir.analysis.linears.values()))
        ir.set_tensor(lin.weight, ir.tensor(lin.weight) * 1.5)
        return PassResult(True)


class _LeaveDead(_TestPass):
    """Test-only: leaves a dead node behind."""
    name = "test-leave-dead"

    def run(self, ir, ctx):
        x = next(n for n in ir.graph.nodes if n.op == "placeholder")
        with ir.graph.inserting_after(x):
            ir.stamp(ir.graph.call_function(aten.neg.default, (x,)))
        return PassResult(True)


@pytest.fixture
def test_passes(monkeypatch):
    """The test-only passes, registered for one test and removed after it."""
    for cls in (_BreakExact, _LeaveDead, _BadResult):
        monkeypatch.setitem(REGISTRY, cls.name, cls)


def test_numeric_diff_reports_each_pass_and_catches_broken_contract(test_passes):
    ir, _ = tiny_ir("llama")
    x = torch.randint(0, 256, (2, 16))
    nd = NumericDiff(x)
    PassManager("fold-norms,quantize-weights{bits=8,group=-1}", [nd]).run(ir)
    assert [r["pass"] for r in nd.report] == ["fold-norms", "quantize-weights{bits=8,group=-1}"]
    assert nd.report[0]["rel_err"] < 1e-5 and 30 < nd.report[1]["sqnr_db"] < 80
    assert ir.stats[1]["diff"]["sqnr_db"] == nd.report[1]["sqnr_db"]
    ir, _ = tiny_ir("llama")
    with pytest.raises(PipelineError, match=r"pass 'test-break-exact' \(#2\) failed: broke its exact contract.*"
                                            r"passes run before: fold-norms"):
        PassManager("fold-norms,test-break-exact", [NumericDiff(x)]).run(ir)


def test_verify_catches_dead_node_and_names_it(test_passes):
    ir, _ = tiny_ir("llama")
    with pytest.raises(PipelineError, match=r"test-leave-dead.*at node 'neg\w*' \(handle \d+\).*dead node"):
        PassManager("test-leave-dead", [Verify()]).run(ir)
    ir, _ = tiny_ir("llama")
    PassManager("fold-norms,quantize-weights", [Verify()]).run(ir)   # real passes keep the invariants


def test_error_without_instruments_names_pass_node_and_history():
    ir, _ = tiny_ir("llama")
    lin = ir.analysis.mlps[0].down
    ir.tensor(lin.weight)[3, 3] = float("inf")
    with pytest.raises(PipelineError) as e:
        PassManager("fold-norms,quantize-weights{bits=4}").run(ir)
    msg = str(e.value)
    assert "quantize-weights{bits=4}' (#2)" in msg and f"node '{lin.node.name}'" in msg
    assert msg.endswith("passes run before: fold-norms")


def test_dump_ir_is_stable_and_per_pass(tmp_path):
    texts = []
    for run in range(2):
        ir, _ = tiny_ir("llama")
        PassManager("fold-norms,quantize-weights{bits=4,group=32}", [DumpIR(tmp_path / str(run))]).run(ir)
        files = sorted(p.name for p in (tmp_path / str(run)).iterdir())
        assert files == ["00-input.txt", "01-fold-norms.txt", "02-quantize-weights.txt"]
        texts.append([(tmp_path / str(run) / f).read_text() for f in files])
    assert texts[0] == texts[1]   # same model, same pipeline: identical dumps
    assert "lowbit.dequantize.default" in texts[0][2] and "lowbit.dequantize" not in texts[0][1]


def test_timing_and_provenance():
    ir, _ = tiny_ir("llama")
    t = Timing()
    PassManager("fold-norms,quantize-weights", [t, Provenance()]).run(ir)
    assert [name for name, _ in t.seconds] == ["fold-norms", "quantize-weights"]
    assert all(sec >= 0 for _, sec in t.seconds) and "seconds" in ir.stats[1]
    made = [n for n in ir.graph.nodes if n.meta.get(meta.CREATED_BY) == "quantize-weights"]
    assert made and all(n.target is torch.ops.lowbit.dequantize.default or n.op == "get_attr" for n in made)
    assert not any(meta.CREATED_BY in n.meta for n in ir.graph.nodes if n.target is aten.linear.default)


class _BadResult(_TestPass):
    """Test-only: returns a non-bool modified."""
    name = "test-bad-result"

    def run(self, ir, ctx):
        return PassResult(1)


def test_manager_rejects_bad_result(test_passes):
    ir, _ = tiny_ir("llama")
    with pytest.raises(PipelineError, match="bool 'modified'"):
        PassManager("test-bad-result").run(ir, PassContext())


def test_test_passes_are_not_left_registered():
    assert not [name for name in REGISTRY if name.startswith("test-")]


@pytest.mark.parametrize("text,done,match", [
    ("fuse-rotations", (), "'fuse-rotations' needs fold-norms before it"),
    ("fuse-rotations", ("fold-norms",), None),
    ("quantize-weights,insert-hadamard", (), "'insert-hadamard' must come before 'quantize-weights'"),
    ("quantize-activations", ("quantize-weights",), None),
    ("insert-hadamard", ("quantize-weights",), "which already ran on this model"),
    ("insert-hadamard{kind=learned}", ("fold-norms",), "with kind=learned: needs learn-rotations before it"),
    ("fold-norms,learn-rotations{loss=local},fuse-rotations{kind=learned},quantize-weights", (),
     "with loss=local: needs quantize-activations after it"),
    ("fold-norms,learn-rotations{load=x},fuse-rotations{kind=learned}", (), None),
    ("fold-norms,learn-rotations,fuse-rotations,quantize-weights", (),
     "needs fuse-rotations{kind=learned} after it"),
    ("quantize-weights,lower-kernels,quantize-kv", (), "'quantize-kv' must come before 'lower-kernels'"),
])
def test_declared_order_is_checked_when_parsed(text, done, match):
    if match is None:
        parse_pipeline(text, done)
    else:
        with pytest.raises(PipelineError, match=match):
            parse_pipeline(text, done)


def test_a_pass_reads_only_the_later_passes_it_declares():
    from lowbit.passes.fuse_rotations import FuseRotations
    from lowbit.passes.quantize_weights import QuantizeWeights
    ctx = PassContext(later={QuantizeWeights: []})
    assert ctx.following(QuantizeWeights) == []
    with pytest.raises(LowbitError, match="without declaring it in reads_later"):
        ctx.following(FuseRotations)
