"""Small models the tests build: transformers configs with random weights for six families,
and the real checkpoints found through LOWBIT_DATA; a runner for the command line."""
import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("LOWBIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
STORIES = DATA / "stories260K" / "stories260K.bin"

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]
# families built from other parts: LayerNorm, learned positions, parallel residuals, post-norms,
# scalars on the stream, mixture of experts (routed only; routed beside a gated shared expert)
MORE_FAMILIES = ["gpt2", "opt", "gpt_neox", "stablelm", "olmo2", "gemma3_text", "falcon", "falcon_alibi", "bloom",
                 "granite", "mixtral", "qwen2_moe"]


def need_data(*parts) -> Path:
    p = DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found: {p} (set LOWBIT_DATA)")
    return p


VARIANTS = {"falcon_alibi": ("falcon", {"alibi": True})}   # a family's config with other parts (ALiBi)


def tiny_config(family: str):
    from transformers import AutoConfig
    family, extra = VARIANTS.get(family, (family, {}))
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    if family == "mistral":
        kw["sliding_window"] = None
    if family == "gpt2":
        kw = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    if family == "bloom":   # ALiBi, a norm right after the embedding, q/k/v interleaved per head
        kw = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "opt":
        kw.update(ffn_dim=96, word_embed_proj_dim=64)
    if family == "falcon":
        kw.pop("head_dim")
        kw.update(new_decoder_architecture=True, num_kv_heads=2)
    if family == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  decoder_sparse_step=1, mlp_only_layers=[])
    if family == "granite":   # scalars on the stream: embedding, residual, attention and logit multipliers
        kw.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0)
    return AutoConfig.for_model(family, **{**kw, **extra})


def tiny_model(family: str, seed: int = 0, **config):
    """A random-weight model; norm weights are randomized too so folding them is a real test.
    `config` overrides the family's tiny config."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    for k, v in config.items():
        setattr(cfg, k, v)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family in FAMILIES and "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3 + (0.0 if family == "gemma" else 1.0))
            elif family not in FAMILIES and p.dim() == 1:   # norm weights and biases, away from 1 and 0
                p.add_(torch.randn_like(p) * 0.3)
    return model


def tiny_hf_dir(path, family: str = "qwen2", dtype=torch.float32, **config):
    """A tiny random-weight model saved as a Hugging Face directory (safetensors in `dtype`) with a
    small BPE tokenizer trained on a sentence; `config` overrides the family's tiny config."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    model = tiny_model(family, **config)
    model.to(dtype).save_pretrained(path)
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                          trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return model.float()


def tiny_ir(family: str, seed: int = 0):
    from lowbit.ir.capture import capture
    from lowbit.ir.graph import ModelInfo
    model = tiny_model(family, seed)
    info = ModelInfo(family, model.config.vocab_size, getattr(model.config, "max_position_embeddings", 128),
                     f"tiny-{family}", "")
    return capture(model, info), model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`lowbit ARGV` in this process: (exit status, stdout, stderr)."""
    from lowbit.tools.cli import main
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
