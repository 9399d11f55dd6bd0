"""TensorRT engines from the trt-flavor ONNX (`lowbit export ART --format trt`). Kept thin: the
ONNX graph and the kernels behind the `lowbit` nodes are verified elsewhere (onnxruntime runs the
qdq graph; tests/test_plugins.py runs the kernels). Written against TensorRT 10's Python API
(Builder, OnnxParser, optimization profiles); TensorRT cannot be installed on the machines this
project is built on, so this module is exercised only where it is (tests gated on the import).

Not yet there: IPluginV3 wrappers for the lowbit domain (Hadamard, LutMatMul, SparseMatMul). A
graph with those nodes is refused with their names; uniform int4/int8 graphs (DequantizeLinear +
MatMul, TensorRT's native weight-only form) build."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lowbit.ir.errors import LowbitError


def build_engine(onnx_path: Path, out: Path, max_batch: int = 8, max_seq: int = 2048, fp16: bool = True) -> Path:
    try:
        import tensorrt as trt
    except ImportError:
        raise LowbitError("TensorRT is not installed (its Python package needs NVIDIA's index)") from None
    import onnx
    custom = sorted({n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.domain == "lowbit"})
    if custom:
        raise LowbitError(f"the graph has lowbit-domain nodes ({', '.join(custom)}) whose TensorRT plugins are not "
                          "written yet; recipes without online Hadamard, lookup tables or outliers build")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise LowbitError("TensorRT could not parse the ONNX: " + "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):   # batch 1..max_batch; new tokens 1..max_seq; past 0..max_seq
        t = network.get_input(i)
        lo, opt, hi = [], [], []
        for axis, d in enumerate(t.shape):
            if d >= 0:
                lo.append(d), opt.append(d), hi.append(d)
            elif axis == 0:
                lo.append(1), opt.append(1), hi.append(max_batch)
            elif t.name.startswith("past_key_values"):
                lo.append(0), opt.append(max_seq // 2), hi.append(max_seq)
            else:
                lo.append(1), opt.append(1), hi.append(2 * max_seq if t.name == "attention_mask" else max_seq)
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LowbitError("TensorRT failed to build the engine (see its log above)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as f:
        f.write(engine)
    os.replace(f.name, out)
    return out
