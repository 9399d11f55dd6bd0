"""quantize-activations and quantize-kv: per-token dynamic quantization simulated with integer
rounding, on the rotated stream; learn-rotations optimizing under them."""
import copy

import pytest
import torch

from lowbit.ir.artifact import load_artifact, save_artifact
from lowbit.ir.hadamard import hadamard_matrix, random_hadamard
from lowbit.ir.quant import quantize_tokens, quantize_tokens_lsq
from lowbit.passes import PassContext, PassManager, PipelineError
from lowbit.passes.fuse_rotations import learned_r2
from lowbit.passes.insert_hadamard import learned_r3, learned_r4
from lowbit.passes.instruments import NumericDiff, sqnr_db
from lowbit.tools.evaluate import read_text, windows
from models import DATA, need_data, tiny_ir

Q = torch.ops.lowbit.quantize_tokens.default
HAD = torch.ops.lowbit.hadamard.default
KRON = torch.ops.lowbit.rotate_kron.default


@pytest.mark.parametrize("bits,group,sym", [(8, -1, False), (4, -1, False), (4, 16, True), (8, 32, True)])
def test_quantize_tokens_grid_and_error(bits, group, sym):
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(bits)) * 3
    y = quantize_tokens(x, bits, group, sym, 1.0)
    g = 64 if group == -1 else group
    xg, yg = x.reshape(2, 5, -1, g), y.reshape(2, 5, -1, g)
    steps = 2 ** bits - 1 if not sym else 2 ** (bits - 1) - 1
    scale = (xg.abs().amax(-1, keepdim=True) if sym else
             xg.amax(-1, keepdim=True).clamp(min=0) - xg.amin(-1, keepdim=True).clamp(max=0)) / steps
    # every output sits on its group's integer grid, within half a step of the input
    assert (yg - xg).abs().max() <= (scale / 2 + 1e-6).max()
    k = yg / scale    # (code - integer zero point): an integer either way
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert len(torch.unique(yg[0, 0, 0])) <= 2 ** bits


def test_clip_shrinks_the_range():
    x = torch.linspace(-1, 1, 64).expand(3, 64)
    y = quantize_tokens(x, 4, -1, True, 0.5)
    # scale 0.5 / 7: codes -8..7 reach [-8/14, 0.5]
    assert y.max() <= 0.5 + 1e-6 and y.min() >= -0.5 * 8 / 7 - 1e-6 and torch.equal(y[0], y[1])


def test_lsq_gradient_sees_the_ranges():
    x = (torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 2).requires_grad_()
    y = quantize_tokens_lsq(x, 4, -1, False, 0.9)
    assert torch.equal(y, quantize_tokens(x, 4, -1, False, 0.9))   # the same values
    # the squared rounding error: zero gradient when rounding is only passed straight through;
    # through the ranges it is nonzero, and a small step against it lowers the error
    err = lambda q, v: (q(v, 4, -1, False, 0.9) - v).pow(2).sum()
    g_ste, = torch.autograd.grad(err(quantize_tokens, x), x)
    g_lsq, = torch.autograd.grad(err(quantize_tokens_lsq, x), x)
    assert g_ste.abs().max() == 0 and g_lsq.abs().max() > 0
    with torch.no_grad():
        assert err(quantize_tokens, x - 1e-3 * g_lsq) < err(quantize_tokens, x)


def test_skip_roles_stay_16_bit(stories_ir):
    PassManager("quantize-activations{bits=4,skip=qkv|down}").run(stories_ir)
    s = stories_ir.analysis
    for a, m in zip(s.attentions, s.mlps):
        assert a.q.node.args[0].target is not Q and a.o.node.args[0].target is Q
        assert m.down.node.args[0].target is not Q and m.up.node.args[0].target is Q
    with pytest.raises(PipelineError, match=r"unknown roles \['gate'\]"):
        PassManager("quantize-activations{skip=gate}")


def test_one_quantizer_per_linear_input_and_kv_at_attention(stories_ir):
    PassManager("fold-norms,fuse-rotations,insert-hadamard,quantize-activations{bits=4},quantize-kv{bits=4}").run(
        stories_ir)
    s = stories_ir.analysis
    for lin in s.linears.values():
        x = lin.node.args[0]
        if lin is s.lm_head:
            assert x.target is not Q
        else:
            assert x.target is Q and x.args[1:] == (4, -1, False, 1.0)
    for m in s.mlps:   # after R4: the down input is quantized after its online Hadamard
        assert m.down.node.args[0].args[0].target is HAD
    a = s.attentions[0]
    assert a.q.node.args[0] is a.k.node.args[0] is a.v.node.args[0]   # q, k, v share one quantizer
    assert sum(n.target is Q for n in stories_ir.graph.nodes) == 5 * (4 + 2)
    for kv in a.sdpa.args[1:3]:
        assert kv.target is Q
    # keys are quantized after RoPE and after the R3 Hadamard: the R3 node is upstream of the key
    # quantizer, and the quantizer feeds nothing but the attention
    key_q = a.sdpa.args[1]
    upstream, todo = set(), [key_q.args[0]]
    while todo:
        n = todo.pop()
        if n not in upstream:
            upstream.add(n)
            todo.extend(n.all_input_nodes)
    assert any(n.target is HAD for n in upstream) and list(key_q.users) == [a.sdpa]
    # idempotent
    res = PassManager("quantize-activations{bits=4},quantize-kv{bits=4}").run(stories_ir)
    assert not any(r.modified for r in res)


def test_sqnr_a8_close_and_rotations_help_a4(stories_ir):
    x = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0))
    ref = stories_ir(x)
    db = {}
    for name, pipe in {"a8kv8": "quantize-activations{bits=8},quantize-kv{bits=8}",
                       "a4kv4": "quantize-activations{bits=4},quantize-kv{bits=4}",
                       "rot-a4kv4": "fold-norms,fuse-rotations,insert-hadamard,quantize-activations{bits=4},"
                                    "quantize-kv{bits=4}"}.items():
        ir = copy.deepcopy(stories_ir)
        PassManager(pipe).run(ir)
        db[name] = sqnr_db(ref, ir(x))
    # measured: 42.7, 19.0, 20.3 dB
    assert db["a8kv8"] > 38 and db["rot-a4kv4"] > db["a4kv4"] + 0.8


def test_group_must_divide():
    with pytest.raises(PipelineError, match="group 24 does not divide head_dim 16"):
        PassManager("quantize-kv{group=24}").run(tiny_ir("llama")[0])
    with pytest.raises(PipelineError, match="group 48 does not divide"):
        PassManager("quantize-activations{group=48}").run(tiny_ir("llama")[0])
    with pytest.raises(PipelineError, match="clip must be in"):
        PassManager("quantize-activations{clip=1.5}")


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
