"""learn-rotations (SpinQuant): Cayley SGD on R1/R2 (loss=ce), and against the later activation and
KV quantizers (loss=local) with learned R3, R4 and smoothing scales; exact once fused."""
import copy

import pytest
import torch

from lowbit.ir.artifact import load_artifact, save_artifact
from lowbit.ir.hadamard import hadamard_matrix, random_hadamard
from lowbit.passes import PassContext, PassManager, PipelineError
from lowbit.passes.fuse_rotations import learned_r2
from lowbit.passes.insert_hadamard import learned_r3, learned_r4
from lowbit.passes.instruments import NumericDiff
from lowbit.tools.evaluate import read_text, windows
from models import DATA, need_data

Q = torch.ops.lowbit.quantize_tokens.default
HAD = torch.ops.lowbit.hadamard.default
KRON = torch.ops.lowbit.rotate_kron.default


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_learn_rotations_on_stories(stories_ir, stories_model, tmp_path):
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 16 * 512)
    rotate = "fold-norms,learn-rotations{{{}}},fuse-rotations{{kind=learned}},insert-hadamard"
    learned = copy.deepcopy(stories_ir)
    PassManager(rotate.format("steps=8,seq=128") + ",quantize-weights{bits=3,group=-1}").run(
        learned, PassContext(calib=calib))
    st = learned.stats[1]
    assert st["steps"] == 8 and st["tokens"] == 8 * 2 * 128 and st["r4"] is True
    assert st["probe_loss_after"] < st["probe_loss_before"]
    r1 = learned.extra_tensors["rotations.R1"]
    assert torch.allclose(r1 @ r1.T, torch.eye(64, dtype=torch.float64), atol=1e-5)
    assert len([k for k in learned.extra_tensors if k.startswith("rotations.R2.")]) == 5
    # saved with the artifact; load= reuses them without learning, and the rotation alone is exact
    save_artifact(learned, tmp_path / "a", {})
    assert torch.equal(load_artifact(tmp_path / "a").extra_tensors["rotations.R1"], r1)
    again = copy.deepcopy(stories_ir)
    PassManager(rotate.format(f"load={tmp_path / 'a'}")).run(again)
    assert again.stats[1]["loaded"] and torch.equal(again.extra_tensors["rotations.R1"], r1)
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        assert rel(again(x), stories_model(x).logits) <= 1e-4


def test_learn_rotations_under_activation_and_kv_quantization(stories_ir, tmp_path):
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)
    pipe = ("fold-norms,learn-rotations{steps=8,seq=128,batch=2},fuse-rotations{kind=learned},insert-hadamard,"
            "quantize-weights{bits=4,group=-1},quantize-activations{bits=4},quantize-kv{bits=4}")
    PassManager(pipe).run(stories_ir, PassContext(calib=calib))
    learn = stories_ir.stats[1]
    assert learn["learned_under"] == ["quantize-weights{bits=4,group=-1}", "insert-hadamard",
                                      "quantize-activations{bits=4}", "quantize-kv{bits=4}"]
    assert learn["probe_loss_after"] < learn["probe_loss_before"]
    # the compiled graph (quantizers included) round-trips through an artifact
    save_artifact(stories_ir, tmp_path / "a", {})
    x = calib[:1, :64]
    assert torch.equal(load_artifact(tmp_path / "a").gm(x), stories_ir.gm(x))


def test_learn_rotations_local_lowers_the_linear_output_error(stories_ir):
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)
    pipe = ("fold-norms,learn-rotations{{steps=60,seq=128,batch=4,lr=0,decay=true,loss=local}},"
            "fuse-rotations{{kind=learned}},insert-hadamard,quantize-weights{{bits=8}}{}")
    with pytest.raises(PipelineError, match="with loss=local: needs quantize-activations after it"):
        PassManager(pipe.format(""))
    PassManager(pipe.format(",quantize-activations{bits=4,clip=0.9}")).run(stories_ir, PassContext(calib=calib))
    learn = stories_ir.stats[1]
    # measured: 0.0058 -> 0.0036 (relative output error of the linears reading the norms)
    assert learn["probe_loss_after"] < 0.85 * learn["probe_loss_before"]
    assert learn["learned_under"] == ["quantize-activations{bits=4,clip=0.9}"]
    # R2 moved too (it rotates the values and o_proj's input); both stay orthogonal
    r2 = stories_ir.extra_tensors[learned_r2(0)]
    assert (r2 - random_hadamard(len(r2), 1)).abs().max() > 1e-3
    assert torch.allclose(r2 @ r2.T, torch.eye(len(r2), dtype=r2.dtype), atol=1e-5)
    with pytest.raises(PipelineError, match="loss must be ce or local"):
        PassManager("learn-rotations{loss=mse}")


def test_learned_r4_is_exact_and_lowers_the_down_input_error(stories_ir):
    """insert-hadamard{kind=learned}: each layer's online R4 is a Kronecker-factored rotation that
    learn-rotations{loss=local} learns from H_n; with every other linear input skipped, the probe
    loss is the down projections' output error alone."""
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)
    x = calib[:2, :64]
    with pytest.raises(PipelineError, match="needs learn-rotations"):
        PassManager("fold-norms,insert-hadamard{kind=learned}").run(copy.deepcopy(stories_ir))
    with pytest.raises(PipelineError, match="R3 and R4 are learned by loss=local only"):
        PassManager("fold-norms,learn-rotations,fuse-rotations{kind=learned},insert-hadamard{kind=learned},"
                    "quantize-weights{bits=4}").run(copy.deepcopy(stories_ir), PassContext(calib=calib))
    diff = NumericDiff(x)
    PassManager("fold-norms,learn-rotations{steps=60,seq=128,batch=4,lr=0,decay=true,loss=local},"
                "fuse-rotations{kind=learned},insert-hadamard{kind=learned},"
                "quantize-activations{bits=4,clip=0.9,skip=qkv|o|up}", [diff]).run(stories_ir, PassContext(calib=calib))
    assert diff.report[3]["pass"] == "insert-hadamard{kind=learned}" and diff.report[3]["rel_err"] < 1e-5
    learn = stories_ir.stats[1]
    # measured: 0.0142 -> 0.0095
    assert learn["r4"] == "learned" and learn["probe_loss_after"] < 0.85 * learn["probe_loss_before"]
    count = lambda op: sum(n.target is op for n in stories_ir.graph.nodes)   # noqa: E731
    s = stories_ir.analysis   # R4 learned in every layer; R3 (q and k) placed too, left at H_hd: no key quantizer
    assert count(KRON) == len(s.mlps) + 2 * len(s.attentions) and count(HAD) == 0
    r3 = stories_ir.extra_tensors[learned_r3(0)]
    assert torch.equal(r3, (hadamard_matrix(len(r3)) / len(r3) ** 0.5).float().double())
    a, b = (stories_ir.extra_tensors[k] for k in learned_r4(0))
    q = torch.kron(a, b)
    assert torch.allclose(q @ q.T, torch.eye(len(q), dtype=q.dtype), atol=1e-5)
    assert (q - hadamard_matrix(len(q)) / len(q) ** 0.5).abs().max() > 1e-3


def test_learned_r3_is_exact_and_lowers_the_key_error(stories_ir):
    """insert-hadamard{kind=learned} also places each attention's learned R3 after RoPE on q and k
    (exact: it cancels in q k^T); with R2 off and every linear input skipped, the probe loss is the
    key cache's error as the queries read it, and learning R3 from H_hd lowers it."""
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)
    diff = NumericDiff(calib[:2, :64])
    PassManager("fold-norms,learn-rotations{steps=40,seq=128,batch=4,lr=0,decay=true,loss=local},"
                "fuse-rotations{kind=learned,r2=false},insert-hadamard{kind=learned},"
                "quantize-activations{bits=4,skip=qkv|o|up|down},quantize-kv{bits=4,clip=0.95}",
                [diff]).run(stories_ir, PassContext(calib=calib))
    assert diff.report[3]["pass"] == "insert-hadamard{kind=learned}" and diff.report[3]["rel_err"] < 1e-5
    learn = stories_ir.stats[1]
    # measured: 0.0174 -> 0.0068
    assert learn["r3"] == "learned" and learn["probe_loss_after"] < 0.9 * learn["probe_loss_before"]
    s = stories_ir.analysis
    count = lambda op: sum(n.target is op for n in stories_ir.graph.nodes)   # noqa: E731
    assert count(HAD) == 0 and count(KRON) == len(s.mlps) + 2 * len(s.attentions)
    r3 = stories_ir.extra_tensors[learned_r3(0)]
    assert torch.allclose(r3 @ r3.T, torch.eye(len(r3), dtype=r3.dtype), atol=1e-5)
    assert (r3 - hadamard_matrix(len(r3)) / len(r3) ** 0.5).abs().max() > 1e-3


def test_learned_smoothing_scales_are_exact_and_lower_the_loss(stories_ir):
    """learn-rotations{smooth=true}: per-channel scales on the values (v's rows / s, o's columns * s
    through the GQA repeat) and on the down input (up's rows / s, down's columns * s), learned
    with the rotations and fused exactly before them."""
    need_data("tinystories", "train-head.txt")
    calib = windows(stories_ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)
    pipe = ("fold-norms,learn-rotations{{steps=30,seq=128,batch=4,lr=0,decay=true,loss=local,smooth={}}},"
            "fuse-rotations{{kind=learned}},insert-hadamard{{kind=learned}},quantize-activations{{bits=4,clip=0.9}},"
            "quantize-kv{{bits=4,clip=0.95}}")
    plain = copy.deepcopy(stories_ir)
    PassManager(pipe.format("false")).run(plain, PassContext(calib=calib))
    diff = NumericDiff(calib[:2, :64])
    PassManager(pipe.format("true"), [diff]).run(stories_ir, PassContext(calib=calib))
    assert diff.report[2]["pass"] == "fuse-rotations{kind=learned}" and diff.report[2]["rel_err"] < 1e-5
    s = stories_ir.analysis
    assert s.attentions[0].n_heads > s.attentions[0].n_kv_heads   # grouped-query: the repeat is exercised
    assert stories_ir.stats[2]["smoothed"] == len(s.attentions) + len(s.mlps)
    sd = stories_ir.extra_tensors["smooth.down.0"]
    assert sd.shape == (s.mlps[0].down.in_features,) and (sd.log().abs().max() > 0.05)
    # measured: probe loss 0.0078 -> 0.0060 without the scales, -> 0.0057 with them
    assert stories_ir.stats[1]["probe_loss_after"] < plain.stats[1]["probe_loss_after"]
    with pytest.raises(PipelineError, match="smooth=true is learned by loss=local only"):
        PassManager("learn-rotations{smooth=true}")
