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
from lowbit.ir.artifact import atomic_dir
from lowbit.ir.errors import LowbitError
from lowbit.ir.formats.base import unpack

from .source import refuse_inexpressible, source_weights

log = logging.getLogger("lowbit")
aten = torch.ops.aten
TOLERANCE = 1e-4   # relative max logits error between transformers' load and the artifact


def _refuse_inexpressible(ir):
    """Beyond what no plain architecture runs (source.refuse_inexpressible): groups that do not
    divide K, and asymmetric weights."""
    refuse_inexpressible(ir, "compressed-tensors")
    uniform = formats.uniform.FORMAT.op
    for n in ir.graph.nodes:
        if n.target is uniform and n.args[2] is not None:
            raise LowbitError(f"compressed-tensors: node '{n.name}' has asymmetric weights; transformers cannot load "
                              "the format's packed zero points (it expects them unpacked, then unpacks them): compile "
                              "with sym=true")
        if n.target is uniform and n.args[-1] % (n.args[-1] if n.args[-2] == -1 else n.args[-2]):
            raise LowbitError(f"compressed-tensors: node '{n.name}': group {n.args[-2]} does not divide K = {n.args[-1]} "
                              "(the format and vLLM's kernels take whole groups; compile with a group that divides K)")


def export_compressed_tensors(ir, out: Path, tokenizer_dir: Path | None = None) -> Path:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    _refuse_inexpressible(ir)
    config, state, quantized = source_weights(ir, "compressed-tensors")
    groups = {}
    for name, lin in quantized.items():
        q = lin.node.meta[meta.QUANT]
        bits, group, sym = q["bits"], q["group"], q["sym"]
        qw, sc = (ir.tensor(a.target) for a in lin.weight_node.args[:2])   # symmetric: no zero points
        codes = unpack(qw, bits, lin.in_features) - (1 << (bits - 1))   # the format's signed codes
        state[f"{name}.weight_packed"] = pack_to_int32(codes.to(torch.int8), bits)
        state[f"{name}.weight_scale"] = sc.to(torch.float32)
        state[f"{name}.weight_shape"] = torch.tensor([lin.out_features, lin.in_features])
        groups.setdefault((bits, group, sym), []).append(name)
    ignore = [lin.module for lin in ir.linears.linears.values() if not lin.quantized]
    qargs = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(groups.items(), key=str)):
        qargs[f"group_{i}"] = QuantizationScheme(
            targets=[f"re:^{n.replace('.', '[.]')}$" for n in names],
            weights=QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=False,
                                     strategy="channel" if group == -1 else "group",
                                     group_size=None if group == -1 else group))
    qcfg = QuantizationConfig(config_groups=qargs, quant_method="compressed-tensors", format="pack-quantized",
                              quantization_status="compressed", ignore=ignore)
    config.quantization_config = qcfg.model_dump(exclude_none=True)
    config.dtype = torch.float32
    from safetensors.torch import save_file
    with atomic_dir(out) as tmp:   # in place only once transformers has read it back
        config.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").exists():
            for f in tokenizer_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        _check(ir, tmp)
    return Path(out)


def _check(ir, out: Path):
    """transformers loads the directory; its logits must be the artifact's (it is written there)."""
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
