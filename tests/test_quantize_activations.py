"""quantize-activations and quantize-kv: per-token dynamic quantization simulated with integer
rounding, on the rotated stream."""
import copy

import pytest
import torch

from lowbit.passes import PassManager, PipelineError
from lowbit.passes.instruments import sqnr_db
from models import tiny_ir

Q = torch.ops.lowbit.quantize_tokens.default
HAD = torch.ops.lowbit.hadamard.default
KRON = torch.ops.lowbit.rotate_kron.default


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


def test_quantize_activations_before_expected():
    """One per-token quantizer on each distinct linear input (q, k, v share one; gate and up too),
    lm_head's input left alone."""
    from graphs import Tiny, assert_matches, ir_of, weights
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("quantize-activations{bits=8}").run(ir)
    q = torch.ops.lowbit.quantize_tokens
    assert_matches(ir, ir_of(Tiny(w, hook=lambda name, x: x if name == "lm_head" else q(x, 8, -1, False, 1.0))))


def test_quantize_kv_before_expected():
    """Keys and values quantized per token and head where the attention reads them."""
    from graphs import Tiny, assert_matches, ir_of, weights
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("quantize-kv{bits=4,clip=0.95}").run(ir)
    q = torch.ops.lowbit.quantize_tokens
    assert_matches(ir, ir_of(Tiny(w, head=lambda name, t: t if name == "q" else q(t, 4, -1, False, 0.95))))
