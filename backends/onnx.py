"""ONNX export of a compiled IR, as the KV-cache decoder (ir/decoder.py) or the full-sequence
form (input_ids -> logits), and an onnxruntime backend.

The IR is lowered for the flavor (`lower-kernels`) and exported by torch.onnx's dynamo exporter at
opset 23 (fused Attention, RMSNormalization, RotaryEmbedding); lowbit's kernel ops are translated
here: ort -> com.microsoft::MatMulNBits; qdq -> blocked INT4/INT8 DequantizeLinear, GatherElements
for lookup tables, ScatterElements for outliers; trt -> qdq plus lowbit-domain nodes (Hadamard,
LutMatMul, SparseMatMul) for the TensorRT plugins. Online Hadamards and learned
Kronecker rotations, activation and KV quantizers become standard ops in every flavor but trt's Hadamard."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from lowbit.ir import formats, hadamard
from lowbit.ir.formats.base import FLOATS, register_lowbit_schema
from lowbit.ir.formats.base import onnx_const as _const
from lowbit.ir.errors import LowbitError

FLAVORS = {"ort": "onnx-ort", "qdq": "onnx-qdq", "trt": "trt"}   # flavor -> lower-kernels target


def _translations(flavor: str = "ort", accuracy_level: int = 0):
    import onnxscript
    L = torch.ops.lowbit
    table = {L.hadamard.default: _hadamard, L.rotate_kron.default: _rotate_kron,
             L.quantize_tokens.default: _quantize_tokens, L.kv_quantize.default: _kv_quantize,
             L.kv_dequantize.default: _kv_dequantize, L.grouped_linear.default: _grouped_linear, **formats.onnx_translations(flavor, accuracy_level)}
    if flavor == "trt":
        register_lowbit_schema("Hadamard", (("X", "T", FLOATS),))
        table[L.hadamard.default] = lambda x: onnxscript.values.Opset("lowbit", 1).Hadamard(x)
    return table


_NEVER_FOLD = {"DequantizeLinear", "GatherElements", "ScatterElements", "Cast"}


def _optimize(model):
    """What torch.onnx's optimize step does (constant folding, then fusing RMSNormalization,
    RotaryEmbedding, ...), except that weight decoding is never folded into float constants:
    that would store the dequantized weights in the file."""
    import onnxscript
    onnxscript.optimizer.optimize_ir(model, should_fold=lambda n: False if n.op_type in _NEVER_FOLD else None)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _four_bit(model, names: set[str]):
    """Store the named uint8/int8 initializers (codes and zero points of 2- to 4-bit weights) as
    ONNX UINT4/INT4 tensors: two values per byte, the types DequantizeLinear reads natively."""
    import ml_dtypes
    import onnx_ir as oi
    for name, v in model.graph.initializers.items():
        if name in names:
            a = v.const_value.numpy()
            a = a.astype(ml_dtypes.int4 if a.dtype == np.int8 else ml_dtypes.uint4)
            v.const_value = oi.Tensor(a, name=name)
            v.dtype = v.const_value.dtype


def _hadamard_factors(n: int) -> list[np.ndarray]:
    """H_n / sqrt(n) as a Kronecker product of small factors: the base order K (if any), then
    Sylvester blocks of at most 16 (radix-16 butterflies: O(n log n) work, no n x n matrix)."""
    k, p = hadamard.factor(n) or (None, None)
    if k is None:
        raise LowbitError(f"no Hadamard transform of size {n}")
    mats = [hadamard.base_matrix(k).numpy()] if k > 1 else []
    while p > 1:
        f = min(p, 16)
        mats.append(hadamard._sylvester(f).numpy())
        p //= f
    mats[0] = mats[0] / math.sqrt(n)
    return [m.astype(np.float32) for m in mats]


def _hadamard(x):
    """lowbit.hadamard in standard ops: x viewed as [rows, f1, ..., fr]; factor i multiplies axis i,
    as a left product on x reshaped to [-1, f_i, f_(i+1) * ... * f_r] (the last one as a right
    product): one Reshape and one MatMul per factor, no transposes."""
    from onnxscript import opset23 as op
    mats = _hadamard_factors(x.shape[-1])
    y = x
    for i, m in enumerate(mats):
        rest = int(np.prod([f.shape[0] for f in mats[i + 1:]], dtype=np.int64))
        if rest == 1:
            y = op.MatMul(op.Reshape(y, _const(np.array([-1, m.shape[0]], np.int64))), _const(m))
        else:   # out[a, :] = sum_c M[c, a] y[c, :]
            y = op.MatMul(_const(np.ascontiguousarray(m.T)), op.Reshape(y, _const(np.array([-1, m.shape[0], rest], np.int64))))
    return op.Reshape(y, op.Shape(x))


def _rotate_kron(x, a, b):
    """lowbit.rotate_kron in standard ops: A^T X B on x reshaped to [-1, p, q]; X A times B where B
    is 1 x 1 (a dense matrix)."""
    from onnxscript import opset23 as op
    if b.shape[0] == 1:
        return op.Mul(op.MatMul(x, a), op.Reshape(b, _const(np.array([1], np.int64))))
    y = op.MatMul(op.Reshape(x, _const(np.array([-1, a.shape[0], b.shape[0]], np.int64))), b)
    return op.Reshape(op.MatMul(op.Transpose(a, perm=[1, 0]), y), op.Shape(x))


def _grouped_linear(x, w, offsets):
    """lowbit.grouped_linear in standard ops, unrolled over the experts (their number is static):
    expert e's rows, Range(end of e-1, end of e), gathered and multiplied by W_e^T, then
    concatenated in order."""
    from onnxscript import opset23 as op
    n_exp, k = offsets.shape[0], x.shape[-1]
    w = op.Reshape(w, _const(np.array([n_exp, -1, k], np.int64)))
    ends = op.Split(op.Cast(offsets, to=7), axis=0, num_outputs=n_exp) if n_exp > 1 else [op.Cast(offsets, to=7)]
    mats = op.Split(w, axis=0, num_outputs=n_exp) if n_exp > 1 else [w]
    axis0, one = _const(np.array([0], np.int64)), _const(np.array(1, np.int64))
    start, parts = _const(np.array([0], np.int64)), []
    for e in range(n_exp):
        rows = op.Range(op.Squeeze(start, axis0), op.Squeeze(ends[e], axis0), one)
        parts.append(op.MatMul(op.Gather(x, rows, axis=0), op.Transpose(op.Squeeze(mats[e], axis0), perm=[1, 0])))
        start = ends[e]
    return op.Concat(*parts, axis=0)


def _token_codes(xg, bits: int, sym: bool, clip: float):
    """Integer codes (as floats), scale and zero point per group along the last axis of xg: the
    arithmetic of lowbit.quantize_tokens (round half to even, clamp) in standard ops."""
    from onnxscript import opset23 as op
    f = lambda v: _const(np.array(v, np.float32))   # noqa: E731
    axis = _const(np.array([-1], np.int64))
    if sym:
        qmax = (1 << (bits - 1)) - 1
        scale = op.Max(op.Div(op.Mul(op.ReduceMax(op.Abs(xg), axis), f(clip)), f(qmax)), f(1e-10))
        zero = op.Add(op.Mul(scale, f(0)), f(1 << (bits - 1)))
        codes = op.Add(op.Clip(op.Round(op.Div(xg, scale)), f(-qmax - 1), f(qmax)), zero)
    else:
        qmax = (1 << bits) - 1
        lo = op.Mul(op.Min(op.ReduceMin(xg, axis), f(0)), f(clip))
        hi = op.Mul(op.Max(op.ReduceMax(xg, axis), f(0)), f(clip))
        scale = op.Max(op.Div(op.Sub(hi, lo), f(qmax)), f(1e-10))
        zero = op.Round(op.Div(op.Neg(lo), scale))
        codes = op.Clip(op.Add(op.Round(op.Div(xg, scale)), zero), f(0), f(qmax))
    return codes, scale, zero


def _quantize_tokens(x, bits: int, group: int, sym: bool, clip: float):
    """lowbit.quantize_tokens in standard ops, so a W4A8/KV-quantized model runs in any runtime."""
    from onnxscript import opset23 as op
    d = x.shape[-1]
    g = d if group == -1 else group
    codes, scale, zero = _token_codes(op.Reshape(x, _const(np.array([-1, d // g, g], np.int64))), bits, sym, clip)
    return op.Reshape(op.Mul(op.Sub(codes, zero), scale), op.Shape(x))


def _kv_quantize(x, bits: int, group: int, sym: bool, clip: float):
    """lowbit.kv_quantize: [B, H, S, D] -> uint8 codes (4-bit ones two per byte), scale, zero point."""
    from onnxscript import opset23 as op
    d = x.shape[-1]
    g = d if group == -1 else group
    shape = lambda *dims: _const(np.array([0, 0, 0, *dims], np.int64))   # noqa: E731  (0: keep B, H, S)
    codes, scale, zero = _token_codes(op.Reshape(x, shape(d // g, g)), bits, sym, clip)
    codes = op.Reshape(codes, shape(d))
    if bits <= 4:
        pairs = op.Reshape(codes, shape(d // 2, 2))
        lo, hi = (op.Gather(pairs, _const(np.array(i, np.int64)), axis=4) for i in (0, 1))
        codes = op.Add(lo, op.Mul(hi, _const(np.array(16, np.float32))))
    last = _const(np.array([-1], np.int64))
    return op.Cast(codes, to=2), op.Squeeze(scale, last), op.Cast(op.Squeeze(zero, last), to=2)


def _kv_dequantize(codes, scale, zero, bits: int):
    from onnxscript import opset23 as op
    shape = lambda *dims: _const(np.array([0, 0, 0, *dims], np.int64))   # noqa: E731
    last = _const(np.array([-1], np.int64))
    c = op.Cast(codes, to=1)
    if bits <= 4:
        hi = op.Floor(op.Div(c, _const(np.array(16, np.float32))))
        lo = op.Sub(c, op.Mul(hi, _const(np.array(16, np.float32))))
        c = op.Reshape(op.Concat(op.Unsqueeze(lo, last), op.Unsqueeze(hi, last), axis=-1), shape(-1))
    cg = op.Reshape(c, shape(scale.shape[-1], -1))
    out = op.Mul(op.Sub(cg, op.Unsqueeze(op.Cast(zero, to=1), last)), op.Unsqueeze(scale, last))
    return op.Reshape(out, shape(-1))


def _half_embedding(ir):
    """Gather from an fp16 copy of the embedding table, cast back: the table is the largest tensor
    a quantized model still holds in float. Kept as is when another op (a tied, unquantized
    lm_head) reads the same table, as a copy would then add to the file."""
    for n in list(ir.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr":
            w = ir.tensor(n.args[0].target)
            if w.dtype != torch.float32 or len(n.args[0].users) > 1:
                continue
            ir.set_tensor(n.args[0].target + "_fp16", w.half())
            with ir.graph.inserting_before(n):
                half = ir.graph.get_attr(n.args[0].target + "_fp16")
                emb = ir.graph.call_function(torch.ops.aten.embedding.default, (half, *n.args[1:]))
                cast = ir.graph.call_function(torch.ops.aten._to_copy.default, (emb,), {"dtype": torch.float32})
            n.replace_all_uses_with(cast)
            ir.graph.erase_node(n)
    ir.remove_dead()
    ir.changed()


_ARITHMETIC = {torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor, torch.ops.aten.div.Tensor}


def _bf16_in_float(ir):
    """onnxruntime's CPU kernels have no bfloat16 arithmetic: an op the graph computes in bfloat16
    (Falcon's ALiBi slopes times positions) computes in float32 and is rounded to bfloat16 after,
    which is what torch's CPU bfloat16 kernels do: the same values."""
    from lowbit.ir import meta
    aten = torch.ops.aten
    for n in [n for n in ir.graph.nodes if n.target in _ARITHMETIC and n.meta.get(meta.TYPE, "").startswith("bf16[")]:
        n.args = tuple(ir.insert(aten.to.dtype, (a, torch.float32), before=n) if isinstance(a, torch.fx.Node) else a
                       for a in n.args)
        ir.insert(aten.to.dtype, (n, torch.bfloat16), after=n, swap=(n, None))
    ir.changed()


def io_names(past_specs) -> tuple[list[str], list[str]]:
    """Input and output names of the decoder form (optimum's and onnxruntime-genai's layout)."""
    return (["input_ids", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n, *_ in past_specs],
            ["logits"] + [f"present.{n}" for n, *_ in past_specs])


def _rename_dims(model, names: dict[str, str]):
    """Give the graph's symbolic input/output dims readable names (batch, sequence_length, ...)."""
    import onnx_ir as oi
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.shape is None:
            continue
        dims = [names.get(str(d), str(d)) if not isinstance(d, int) else d for d in v.shape]
        v.shape = oi.Shape([oi.SymbolicDim(d) if isinstance(d, str) else d for d in dims])


def export_onnx(ir, out: Path, flavor: str = "ort", form: str = "decoder", accuracy_level: int = 4,
                half_embedding: bool = True) -> Path:
    """Lower a copy of the IR for `flavor` and export its decoder (KV cache) or full-sequence form;
    returns the path written. accuracy_level is MatMulNBits' (0: exact float, 4: int8 activations)."""
    from lowbit.ir.decoder import to_decoder
    from lowbit.passes import PassManager
    if flavor not in FLAVORS:
        raise LowbitError(f"flavor '{flavor}' is not available yet (available: {', '.join(FLAVORS)})")
    if form not in ("decoder", "full"):
        raise LowbitError(f"form must be decoder or full, not '{form}'")
    # a fork, so lowering replaces tensors there only; the decoder rewrite first, as it reads the
    # structure that lowering hides
    ir = to_decoder(ir) if form == "decoder" else ir.fork()
    PassManager(f"lower-kernels{{target={FLAVORS[flavor]}}}").run(ir)
    table = _translations(flavor, accuracy_level)
    left = sorted({str(n.target) for n in ir.graph.nodes if n.op == "call_function"
                   and getattr(n.target, "namespace", None) == "lowbit" and n.target not in table})
    if left:
        raise LowbitError(f"the {flavor} flavor cannot express {', '.join(left)} yet")
    if half_embedding:
        _half_embedding(ir)
    _bf16_in_float(ir)
    A = torch.export.Dim.AUTO
    if form == "decoder":
        module, (b, s, p) = ir.gm, (2, 5, 3)
        example = (torch.randint(0, ir.info.vocab_size, (b, s)), torch.ones(b, p + s, dtype=torch.long),
                   torch.arange(p, p + s).expand(b, s), *[torch.zeros(b, h, p, x, dtype=t) for _, t, h, x in ir.past_specs])
        shapes = ({0: A, 1: A}, {0: A, 1: A}, {0: A, 1: A}, *[{0: A, 2: A}] * len(ir.past_specs))
        inputs, outputs = io_names(ir.past_specs)
    else:
        module, example, shapes = ir.gm, (torch.randint(0, ir.info.vocab_size, (2, 16)),), ({0: A, 1: A},)
        inputs, outputs = ["input_ids"], ["logits"]
    prog = torch.onnx.export(module.eval(), example, dynamo=True, opset_version=23, verbose=False, optimize=False,
                             custom_translation_table=table, dynamic_shapes=shapes,
                             input_names=inputs, output_names=outputs)
    taps = _tap_names(ir.gm.graph, prog.exported_program.graph, outputs)
    _optimize(prog.model)
    produced = {o.name for n in prog.model.graph for o in n.outputs}
    prog.model.metadata_props["lowbit.taps"] = json.dumps({v: h for v, h in taps.items() if v in produced})
    dims = {}
    for v, name in zip(prog.model.graph.inputs, inputs):   # symbols by role, read off the example's layout
        sh = [str(x) for x in v.shape]
        if name == "input_ids":
            dims.update({sh[0]: "batch", sh[1]: "sequence_length"})
        elif name == "attention_mask":
            dims[sh[1]] = "total_sequence_length"
        elif name.startswith("past_key_values"):
            dims[sh[2]] = "past_sequence_length"
    for v in prog.model.graph.outputs:
        if v.name.startswith("present"):
            dims[str(v.shape[2])] = "total_sequence_length"
    _rename_dims(prog.model, dims)
    _four_bit(prog.model, ir.scratch.get("onnx_4bit", set()))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    big = sum(v.const_value.nbytes for v in prog.model.graph.initializers.values()) > 1 << 30
    # written beside the target and moved into place whole (the model and any external data file)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prog.save(str(Path(tmp) / out.name), external_data=big)
        for f in Path(tmp).iterdir():
            os.replace(f, out.parent / f.name)
    return out


def _tap_names(ir_graph, exported_graph, output_names) -> dict[str, int]:
    """{ONNX value name: debug handle} of the IR's nodes: the exporter names each value after the
    node of its own trace of the module, which runs the IR's nodes in order, so the i-th call of an
    op in one is the i-th in the other (ops whose counts differ are left out); a node whose value
    is a graph output takes that output's name (the output projection's is `logits`)."""
    from collections import defaultdict

    from lowbit.ir import meta
    ours, theirs = defaultdict(list), defaultdict(list)
    for g, into in ((ir_graph, ours), (exported_graph, theirs)):
        for n in g.nodes:
            if n.op == "call_function":
                into[n.target].append(n)
    out_node = next(n for n in exported_graph.nodes if n.op == "output")
    results = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    renamed = {t: name for t, name in zip(results, output_names) if t is not None}
    out = {}
    for target, nodes in ours.items():
        if len(nodes) == len(theirs[target]):
            out.update({renamed.get(t, t.name): n.meta[meta.HANDLE] for n, t in zip(nodes, theirs[target])
                        if meta.HANDLE in n.meta})
    return out


def run_taps(path, input_ids: torch.Tensor, handles: set[int]) -> tuple[dict[int, torch.Tensor], dict[int, str]]:
    """Run an ONNX file lowbit exported with the values holding the given taps (its `lowbit.taps`
    metadata) made outputs, on full windows (the decoder form with an empty cache): -> ({handle:
    value}, logits under handle 0), and {handle: the op onnxruntime replaces that value's node by,
    when it runs the file as deployed (a fusion; the value then exists only inside it)}."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    taps = {v: h for v, h in json.loads(props.get("lowbit.taps", "{}")).items() if h in handles}
    fused = _fused_taps(path, model, taps)
    have = {o.name for o in model.graph.output}
    for v in taps:
        if v not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(v))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    so.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    b, s = input_ids.shape
    feed = {"input_ids": input_ids.numpy()}
    if "attention_mask" in names:
        feed.update(attention_mask=np.ones((b, s), np.int64), position_ids=np.broadcast_to(np.arange(s), (b, s)).copy())
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), np.uint8 if i.type == "tensor(uint8)" else np.float32)
    outs = [o.name for o in sess.get_outputs()]
    got = dict(zip(outs, sess.run(outs, feed)))
    values = {h: torch.from_numpy(np.asarray(got[v], np.float32)) for v, h in taps.items()}
    values[0] = torch.from_numpy(got["logits"])
    return values, fused


def _fused_taps(path, model, taps: dict[str, int]) -> dict[int, str]:
    """Taps whose values onnxruntime's graph optimizations fuse away, with the op that took over
    the node producing each (the first node of the optimized graph that reads that node's input
    and is of another kind)."""
    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath)
    produced = {o for n in opt.graph.node for o in n.output} | {o.name for o in opt.graph.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    fused = {}
    for v, h in taps.items():
        if v in produced or v not in producer:
            continue
        src = producer[v]
        by = next((n.op_type for n in opt.graph.node if n.op_type != src.op_type and set(n.input) & set(src.input)),
                  "another node")
        fused[h] = by
    return fused


class OrtBackend:
    """An onnxruntime session over an exported model, decoder or full-sequence form."""
    name = "ort"

    def __init__(self, path, optimize: bool = True, threads: int | None = None, exact: bool = True):
        """exact: have onnxruntime's QDQ fusion (DequantizeLinear + MatMul -> MatMulNBits, on by
        default) compute in float instead of with int8 activations (accuracy level 4)."""
        import onnxruntime as ort
        so = ort.SessionOptions()
        if exact:
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        so.intra_op_num_threads = threads or torch.get_num_threads()
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        ins = self.session.get_inputs()
        self.inputs = [i.name for i in ins]
        types = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}
        self.past_specs = [(i.name, types[i.type], i.shape[1], i.shape[3]) for i in ins if i.name.startswith("past_key_values")]

    def empty_past(self, b):
        return [np.zeros((b, h, 0, x), t) for _, t, h, x in self.past_specs]

    def step(self, input_ids, attention_mask, position_ids, past):
        """One decoder call: -> (logits, presents), numpy in and out."""
        out = self.session.run(None, dict(zip(self.inputs, [input_ids, attention_mask, position_ids, *past])))
        return out[0], out[1:]

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        if len(self.inputs) == 1:
            return torch.from_numpy(self.session.run(["logits"], {"input_ids": input_ids.numpy()})[0])
        b, s = input_ids.shape
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        return torch.from_numpy(self.step(input_ids.numpy(), np.ones((b, s), np.int64), pos, self.empty_past(b))[0])


def cached_export(source, flavor: str = "ort", accuracy_level: int = 4, log=None) -> Path:
    """The decoder ONNX of an artifact directory, or of a loaded IR (a model exported as is, in
    float), exported once into the cache (~/.cache/lowbit/onnx) under a key of everything it
    depends on: the artifact's manifest and graph or the model's hash, versions, the exporter's code."""
    import hashlib
    import json

    from lowbit.ir import decoder
    from lowbit.ir.artifact import load_artifact
    from lowbit.ir.graph import IR
    from lowbit.ir.load import cache_dir
    from lowbit.ir.load import package_version as v
    from lowbit.passes import lower_kernels
    h = hashlib.sha256(json.dumps([flavor, accuracy_level, v("lowbit"), v("torch"), v("onnxscript")]).encode())
    for f in sorted(Path(formats.__file__).parent.glob("*.py")) + [Path(m.__file__) for m in (decoder, lower_kernels)]:
        h.update(f.read_bytes())   # the exporter's own code: a change re-exports
    h.update(Path(__file__).read_bytes())
    if isinstance(source, IR):
        h.update(source.info.source_hash.encode())
    else:
        for f in ("manifest.json", "graph.json"):
            h.update((Path(source) / f).read_bytes())
    path = cache_dir() / "onnx" / h.hexdigest()[:20] / "model.onnx"
    if not path.exists():
        name = source.info.source if isinstance(source, IR) else source
        if log:
            log(f"exporting {name} to ONNX (flavor {flavor}); cached as {path.parent}")
        export_onnx(source if isinstance(source, IR) else load_artifact(source), path, flavor,
                    accuracy_level=accuracy_level)
    return path
