"""The KV-cache decoder form (ir/decoder.py), token-by-token generation, and `lowbit run`."""
import numpy as np
import pytest
import torch

from lowbit.ir.decoder import to_decoder
from lowbit.passes import PassManager
from lowbit.tools.generate import TorchDecoder, generate
from models import tiny_ir


def _empty(d, b):
    return [torch.zeros(b, h, 0, x, dtype=t) for _, t, h, x in d.past_specs]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "phi3"])
def test_decoder_steps_reproduce_full_sequence(family):
    ir, _ = tiny_ir(family)
    d = to_decoder(ir)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = ir(x)
    ones = lambda n: torch.ones(2, n, dtype=torch.long)  # noqa: E731
    full = d.gm(x, ones(12), torch.arange(12).expand(2, 12), *_empty(d, 2))
    assert torch.allclose(full[0], ref, atol=1e-5) and full[1].shape == (2, d.past_specs[0][2], 12, d.past_specs[0][3])
    out = d.gm(x[:, :5], ones(5), torch.arange(5).expand(2, 5), *_empty(d, 2))
    logits, past = [out[0]], out[1:]
    for t in range(5, 12):
        out = d.gm(x[:, t:t + 1], ones(t + 1), torch.full((2, 1), t), *past)
        logits.append(out[0])
        past = out[1:]
    assert torch.allclose(torch.cat(logits, 1), ref, atol=1e-5)


def test_decoder_left_padding_matches_unpadded():
    ir, _ = tiny_ir("llama")
    d = to_decoder(ir)
    x = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    ref = ir(x)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
    pos = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.arange(6)[None]], 1)
    out = d.gm(padded, mask, pos, *_empty(d, 1))
    assert torch.isfinite(out[0]).all()   # padding rows attend to themselves, not to nothing
    assert torch.allclose(out[0][:, 3:], ref, atol=1e-5)


def test_decoder_caches_quantized_kv_and_keeps_rotations():
    ir, _ = tiny_ir("llama")
    PassManager("fold-norms,fuse-rotations,insert-hadamard,quantize-weights{bits=4,group=32},"
                "quantize-activations{bits=8},quantize-kv{bits=4}").run(ir)
    d = to_decoder(ir)
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    ref = ir(x)
    out = d.gm(x[:, :4], torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None], *_empty(d, 1))
    logits, past = [out[0]], out[1:]
    for t in range(4, 10):
        out = d.gm(x[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), *past)
        logits.append(out[0])
        past = out[1:]
    assert torch.allclose(torch.cat(logits, 1), ref, atol=1e-4)
    # the cache holds 4-bit codes, two per byte, with a scale and zero point per token and head
    names = [n for n, *_ in d.past_specs]
    assert names[:3] == ["0.key", "0.key_scale", "0.key_zero"]
    codes, scale, zero = past[:3]
    assert codes.dtype == torch.uint8 and codes.shape[-1] == d.past_specs[0][3] == ir.analysis.attentions[0].head_dim // 2
    assert scale.shape[-1] == 1 and zero.dtype == torch.uint8 and codes.shape[2] == 10


def test_generation_torch_and_ort_agree(stories_ir, tmp_path):
    from lowbit.backends.onnx import OrtBackend, export_onnx
    PassManager("quantize-weights{bits=4,group=32,sym=false}").run(stories_ir)
    prompt = stories_ir.tokenizer.encode("Once upon a time")
    a = generate(TorchDecoder(stories_ir), prompt, 24)
    b = generate(OrtBackend(export_onnx(stories_ir, tmp_path / "m.onnx", accuracy_level=0, half_embedding=False)), prompt, 24)
    assert a["ids"] == b["ids"] and len(a["ids"]) == 24
    text = stories_ir.tokenizer.decode(a["ids"])
    assert len(text.split()) > 10


def test_sampling_is_seeded_and_top_k_limits_choices():
    from lowbit.tools.generate import _pick
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.1]]))
    picks = {int(_pick(logits, 1.0, 2, np.random.default_rng(s))[0]) for s in range(50)}
    assert picks == {0, 1}
    assert _pick(logits, 0.0, 0, None)[0] == 0


def test_run_cli(tmp_path, capsys):
    from lowbit.tools.cli import main
    from models import STORIES, need_data
    need_data("stories260K", "stories260K.bin")
    main(["run", str(STORIES), "--prompt", "Once upon a time", "--max-new-tokens", "12"])
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time") and len(out.out.split()) > 8
    assert "decode 11 tokens" in out.err
