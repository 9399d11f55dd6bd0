"""compressed-tensors checkpoints (vLLM's and transformers' quantized format): a Hugging Face
directory of the source architecture whose linears hold lowbit's uniform integer weights as the
format's "pack-quantized" tensors, packed by the compressed-tensors package itself.

Per quantized linear X: `X.weight_packed` int32 (the signed codes, code - 2^(bits-1), eight
4-bit codes per word), `X.weight_scale` [N, groups] (lowbit's fp16 scales, stored exactly in the
checkpoint's float dtype) and `X.weight_shape`. One config group per (bits, group size, symmetry), its
targets the linears' names, so FineQuant's per-matrix group sizes are per-layer groups. What the
rotations fused into the weights stays there; the norms they folded become pure normalizations
(each weight set to what makes its module the identity scale). Everything the architecture cannot
express is refused by node: online Hadamards and rotations, activation and KV quantizers,
lookup-table and sparse weights, groups that do not divide K; so are asymmetric weights, whose
packed zero points transformers (5.24, with compressed-tensors 0.20) cannot load: it makes the
parameter unpacked, then unpacks what it read. The written directory is loaded
back by transformers and its logits checked against the artifact's own before the export counts
as done (what the checks above do not see, a centered LayerNorm stream, fails there)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from lowbit.ir import formats, meta
from lowbit.ir.errors import LowbitError
from lowbit.ir.formats.base import unpack
from lowbit.ir.graph import short_name

log = logging.getLogger("lowbit")
aten = torch.ops.aten
TOLERANCE = 1e-4   # relative max logits error between transformers' load and the artifact


def _refuse_inexpressible(ir):
    """One line naming the first node the source architecture cannot express."""
    uniform = formats.uniform.FORMAT.op
    for n in ir.graph.nodes:
        if n.op != "call_function":
            continue
        if getattr(n.target, "namespace", None) == "lowbit" and n.target is not uniform:
            raise LowbitError(f"compressed-tensors: node '{n.name}' ({n.target}) has no form in the source "
                              "architecture (export weight-only uniform recipes: rtn, gptq, finequant, with fused rotations)")
    for n in ir.graph.nodes:
        if n.target is uniform and n.args[2] is not None:
            raise LowbitError(f"compressed-tensors: node '{n.name}' has asymmetric weights; transformers cannot load "
                              "the format's packed zero points (it expects them unpacked, then unpacks them): compile "
                              "with sym=true")
        if n.target is uniform and n.args[-1] % (n.args[-1] if n.args[-2] == -1 else n.args[-2]):
            raise LowbitError(f"compressed-tensors: node '{n.name}': group {n.args[-2]} does not divide K = {n.args[-1]} "
                              "(the format and vLLM's kernels take whole groups; compile with a group that divides K)")


def _identity_norm(module) -> bool:
    """Set a norm module's own parameters so it only normalizes (weight 1 or 0, whichever does,
    bias 0); False when neither does."""
    params = dict(module.named_parameters(recurse=False))
    if any(p.dim() != 1 for p in params.values()):
        return False
    x = torch.randn(3, next(iter(params.values())).shape[-1], generator=torch.Generator().manual_seed(0))
    rms = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
    lay = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=getattr(module, "eps", getattr(module, "variance_epsilon", 1e-5)))
    for w in (1.0, 0.0):
        with torch.no_grad():
            for name, p in params.items():
                p.fill_(w if name == "weight" else 0.0)
            y = module(x)
        if torch.allclose(y, rms, atol=1e-5) or torch.allclose(y, lay, atol=1e-5):
            return True
    return False


def export_compressed_tensors(ir, out: Path, tokenizer_dir: Path | None = None) -> Path:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = dict(ir.info.extra.get("config") or {})
    if not cfg_dict:
        raise LowbitError("compressed-tensors: the artifact does not carry its source model's config (compile it again)")
    _refuse_inexpressible(ir)
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    s = ir.linears
    by_module = {lin.module: lin for lin in s.linears.values()}
    emb = next(n for n in ir.graph.nodes if n.target is aten.embedding.default).args[0].target
    head = s.lm_head.weight if s.lm_head is not None else None
    config.tie_word_embeddings = head == emb
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state, groups, ignore = {}, {}, []
    targets = set(ir.tensor_targets())
    aliases: dict[int, list[str]] = {}   # tied parameters: one tensor, several names
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        lin = by_module.get(name)
        if lin is not None and lin.quantized:
            q = lin.node.meta[meta.QUANT]
            bits, group, sym = q["bits"], q["group"], q["sym"]
            qw, sc = (ir.tensor(a.target) for a in lin.weight_node.args[:2])   # symmetric: no zero points
            k = lin.in_features
            mid = 1 << (bits - 1)
            codes = unpack(qw, bits, k) - mid   # the format's signed codes
            state[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), bits)
            state[f"{name}.weight_scale"] = sc.to(torch.float32)
            state[f"{name}.weight_shape"] = torch.tensor([lin.out_features, k])
            if lin.bias:
                state[f"{name}.bias"] = ir.tensor(lin.bias)
            groups.setdefault((bits, group, sym), []).append(name)
            continue
        if lin is not None:   # a linear left in float
            ignore.append(name)
            state[f"{name}.weight"] = ir.tensor(lin.weight)
            if lin.bias:
                state[f"{name}.bias"] = ir.tensor(lin.bias)
            continue
        found = {p: next((f"model.{a}" for a in aliases[id(t)] if f"model.{a}" in targets), None) for p, t in own.items()}
        if module is model.get_input_embeddings():   # the table the lookup reads, under whichever name capture kept
            found["weight"] = emb
        missing = [p for p, target in found.items() if target is None]
        if missing and not _identity_norm(module):
            raise LowbitError(f"compressed-tensors: '{name}' ({type(module).__name__}) is not in the artifact and is "
                              "not a norm that can be made a pure normalization")
        for p, t in own.items():
            state[f"{name}.{p}"] = ir.tensor(found[p]) if found[p] else t.detach().clone()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    qargs = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items(), key=str)):
        qargs[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{n.replace('.', '[.]')}$" for n in names],
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=False,
                                     strategy="channel" if group == -1 else "group",
                                     group_size=None if group == -1 else group))
    qcfg = QuantizationConfig(config_groups=qargs, quant_method="compressed-tensors", format="pack-quantized",
                              quantization_status="compressed", ignore=ignore)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.quantization_config = qcfg.model_dump(exclude_none=True)
    config.dtype = torch.float32
    config.save_pretrained(out)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").exists():
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, out / f.name)
    _check(ir, out)
    return out


def _check(ir, out: Path):
    """transformers loads the directory; its logits must be the artifact's."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, ir.info.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref = model(x).logits, ir(x)
    err = float((got - ref).abs().max() / ref.abs().max())
    if not err <= TOLERANCE:
        raise LowbitError(f"compressed-tensors: transformers' load of {out} is off the artifact by {err:.1e} "
                          f"(relative max logits error, bound {TOLERANCE})")
    (out / "lowbit_export.json").write_text(json.dumps({"logits_rel_err": err}) + "\n")
    log.info("compressed-tensors: transformers loads %s; logits within %.1e of the artifact", out, err)
