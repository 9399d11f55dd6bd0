"""An artifact's source architecture rebuilt: its Hugging Face config and the value of every
parameter, read from the IR. What exports to other runtimes' formats write
(compressed-tensors, GGUF): each keeps the quantized linears in its own layout and takes the rest
from here."""
from __future__ import annotations

import torch

from lowbit.ir import formats
from lowbit.ir.errors import LowbitError

aten = torch.ops.aten


def refuse_inexpressible(ir, fmt: str):
    """One line naming the first node a plain source architecture cannot run: every lowbit op
    but the uniform weights' dequantization (online rotations, activation and KV quantizers,
    lookup tables, outliers)."""
    for n in ir.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "lowbit" and n.target is not formats.uniform.FORMAT.op:
            raise LowbitError(f"{fmt}: node '{n.name}' ({n.target}) has no form in the source architecture "
                              "(export weight-only uniform recipes: rtn, gptq, finequant, with fused rotations)")


def _identity_norm(module) -> bool:
    """Set a norm module's own parameters so it only normalizes (weight 1 or 0, whichever does,
    bias 0): the value a norm folded into its linears must take; False when neither does."""
    params = dict(module.named_parameters(recurse=False))
    if any(p.dim() != 1 for p in params.values()):
        return False
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    x = torch.randn(3, next(iter(params.values())).shape[-1], generator=torch.Generator().manual_seed(0))
    rms = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    lay = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    for w in (1.0, 0.0):
        with torch.no_grad():
            for name, p in params.items():
                p.fill_(w if name == "weight" else 0.0)
            y = module(x)
        if torch.allclose(y, rms, atol=1e-5) or torch.allclose(y, lay, atol=1e-5):
            return True
    return False


def source_weights(ir, fmt: str):
    """(config, {parameter: float tensor}, {module name: quantized Linear}): every
    parameter of the source architecture outside the quantized linears, from the IR, with tied
    ones once (config.tie_word_embeddings says whether lm_head still reads the embedding), and
    norms that fold-norms folded set to what makes them pure normalizations."""
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = dict(ir.info.extra.get("config") or {})
    if not cfg:
        raise LowbitError(f"{fmt}: the artifact does not carry its source model's config (compile it again)")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    s = ir.linears
    by_module = {lin.module: lin for lin in s.linears.values()}
    emb = next(n for n in ir.graph.nodes if n.target is aten.embedding.default).args[0].target
    config.tie_word_embeddings = s.lm_head is not None and s.lm_head.weight == emb
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    targets = set(ir.tensor_targets())
    aliases: dict[int, list[str]] = {}   # tied parameters: one tensor, several names
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    state, quantized = {}, {}
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        lin = by_module.get(name)
        if not own or (lin is not None and config.tie_word_embeddings and lin is s.lm_head):
            continue
        if lin is not None:
            if lin.quantized:
                quantized[name] = lin
            else:
                state[f"{name}.weight"] = ir.tensor(lin.weight)
            if lin.bias:
                state[f"{name}.bias"] = ir.tensor(lin.bias)
            continue
        found = {p: next((f"model.{a}" for a in aliases[id(t)] if f"model.{a}" in targets), None) for p, t in own.items()}
        if module is model.get_input_embeddings():   # the table the lookup reads, under whichever name capture kept
            found["weight"] = emb
        missing = [p for p, target in found.items() if target is None]
        if missing and not _identity_norm(module):
            raise LowbitError(f"{fmt}: '{name}' ({type(module).__name__}) is not in the artifact and is not a norm "
                              "that can be made a pure normalization")
        for p, t in own.items():
            state[f"{name}.{p}"] = ir.tensor(found[p]) if found[p] else t.detach().clone()
    return config, state, quantized
