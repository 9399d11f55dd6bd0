"""lower-kernels for each ONNX target, and the ONNX export in each flavor (ort, qdq, trt) of the
decoder (KV cache) and full-sequence forms, run by onnxruntime against the reference backend."""
from collections import Counter

import onnx
import pytest
import torch

from lowbit.backends.onnx import OrtBackend, export_onnx
from lowbit.ir.errors import LowbitError
from lowbit.passes import PassContext, PassManager
from lowbit.tools.evaluate import read_text, windows
from models import DATA, need_data, tiny_ir

L = torch.ops.lowbit

def _ops(model) -> Counter:
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def _decode(backend, ids, prefill):
    """Logits of ids from one prefill call, then one call per token (numpy decoder interface)."""
    import numpy as np
    n = ids.shape[1]
    out, past = backend.step(ids[:, :prefill], np.ones((1, prefill), np.int64), np.arange(prefill)[None], backend.empty_past(1))
    logits = [out]
    for t in range(prefill, n):
        out, past = backend.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        logits.append(out)
    return torch.from_numpy(np.concatenate(logits, 1))


@pytest.mark.parametrize("flavor", ["ort", "qdq"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_export_matches_reference(family, flavor, tmp_path):
    ir, _ = tiny_ir(family)
    PassManager("fold-norms,fuse-rotations,insert-hadamard,split-outliers{fraction=0.01,sensitive=0},"
                "quantize-weights{bits=4,group=32,sym=false}").run(ir)
    x = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))
    ref = ir(x)
    path = export_onnx(ir, tmp_path / "m.onnx", flavor, accuracy_level=0, half_embedding=False)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model)
    assert ops["Attention"] == 2 and ops["ScatterElements"] == 14 and "MatMulNBits" not in str(ops)
    assert ops["MatMul"] < 60   # Hadamards as radix-16 factors, never one n x n matmul per transform
    assert len(model.graph.input) == 3 + 4 and [o.name for o in model.graph.output][:2] == ["logits", "present.0.key"]
    # graph optimizations off (no fusion can hide a broken graph) and on; measured ~1e-6 relative
    for optimize in (False, True):
        got = OrtBackend(path, optimize=optimize).logits(x)
        assert (got - ref).abs().max() <= 2e-5 * ref.abs().max()
    # token by token through the KV cache, another batch and length than the export's example
    got = _decode(OrtBackend(path), x[:1].numpy(), 5)
    assert (got - ref[:1]).abs().max() <= 2e-5 * ref.abs().max()


def test_ort_flavor_uses_matmulnbits_and_4bit_initializers_for_qdq(tmp_path):
    ir, _ = tiny_ir("llama")
    PassManager("quantize-weights{bits=4,group=32,sym=true}").run(ir)
    ort = onnx.load(export_onnx(ir, tmp_path / "ort.onnx", "ort"))
    assert _ops(ort)["com.microsoft:MatMulNBits"] == 14
    qdq = onnx.load(export_onnx(ir, tmp_path / "qdq.onnx", "qdq"))
    assert _ops(qdq)["DequantizeLinear"] == 14 and "com.microsoft" not in str(_ops(qdq))
    # symmetric int4: signed INT4 codes, no zero point (TensorRT's native form)
    dq = [n for n in qdq.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in qdq.graph.initializer}
    assert all(len(n.input) == 2 or not n.input[2] for n in dq)
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)


@pytest.mark.parametrize("accuracy_level,bound", [(0, 2e-5), (4, 0.05)])
def test_group_minimum_runs_as_matmulnbits_with_float_zero_points(tmp_path, accuracy_level, bound):
    """offset=min weights (the Q4_1 grid): MatMulNBits with float zero points -min / scale, run by
    onnxruntime at both accuracy levels; the qdq flavor refuses them by node."""
    ir, _ = tiny_ir("llama")
    PassManager("quantize-weights{bits=4,group=32,sym=false,offset=min}").run(ir)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = ir(x)
    path = export_onnx(ir, tmp_path / "m.onnx", "ort", accuracy_level=accuracy_level, half_embedding=False)
    model = onnx.load(path)
    zps = {n.input[3] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(zps) == 14 and all(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer if i.name in zps)
    got = OrtBackend(path).logits(x)
    assert (got - ref).abs().max() <= bound * ref.abs().max()   # level 4: int8 activations
    with pytest.raises(LowbitError, match="offset=min"):
        export_onnx(ir, tmp_path / "q.onnx", "qdq")


def test_trt_flavor_has_lowbit_nodes(tmp_path):
    ir, _ = tiny_ir("llama")
    PassManager("fold-norms,fuse-rotations,insert-hadamard,split-outliers{fraction=0.01,sensitive=0},"
                "quantize-weights{bits=4,group=32,sym=true}").run(ir)
    model = onnx.load(export_onnx(ir, tmp_path / "trt.onnx", "trt"))
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model)
    assert ops["lowbit:Hadamard"] >= 2 and ops["lowbit:SparseMatMul"] == 14 and ops["DequantizeLinear"] == 14


def test_export_rejects_unknown_flavor_and_form(tmp_path):
    ir, _ = tiny_ir("llama")
    with pytest.raises(LowbitError, match="flavor 'gguf'"):
        export_onnx(ir, tmp_path / "m.onnx", "gguf")
    with pytest.raises(LowbitError, match="form must be"):
        export_onnx(ir, tmp_path / "m.onnx", form="encoder")


@pytest.fixture(scope="module")
def stories_lut(_stories_captured):
    """stories260K with 3-bit lookup tables and sparse outliers (calibrated on TinyStories)."""
    import copy
    need_data("tinystories", "train-head.txt")
    ir = copy.deepcopy(_stories_captured)
    calib = windows(ir.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 128, 8 * 128)
    PassManager("split-outliers{fraction=0.0045,samples=8},quantize-weights{method=squeezellm,bits=3}").run(
        ir, PassContext(calib=calib))
    return ir


@pytest.mark.parametrize("flavor", ["ort", "qdq", "trt"])
def test_lookup_tables_and_outliers_export(stories_lut, flavor, tmp_path):
    ir = stories_lut
    path = export_onnx(ir, tmp_path / "m.onnx", flavor, accuracy_level=0, half_embedding=False)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model)
    if flavor == "trt":
        assert ops["lowbit:LutMatMul"] == 35 and ops["lowbit:SparseMatMul"] == 35
        return
    assert ops["GatherElements"] == 35 and ops["ScatterElements"] == 35
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    ref = ir(x)
    assert (OrtBackend(path, optimize=False).logits(x) - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_file_size_is_close_to_the_packed_size(stories_ir, tmp_path):
    """No silent float weights: the qdq file holds 4-bit codes as INT4 (two per byte)."""
    from lowbit.tools.report import storage
    PassManager("quantize-weights{bits=4,group=32,lm_head=true}").run(stories_ir)
    packed = storage(stories_ir)["total_bytes"]
    for flavor in ("ort", "qdq"):
        model = onnx.load(export_onnx(stories_ir, tmp_path / f"{flavor}.onnx", flavor))
        # the weights; the rest of the file is graph structure, ~250 KB here, negligible for real models.
        # measured: 0.84x (ort) with the embedding stored in fp16 (the artifact keeps it fp32)
        size = sum(onnx.numpy_helper.to_array(i).nbytes if i.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
                   else (onnx.numpy_helper.to_array(i).size + 1) // 2 for i in model.graph.initializer)
        assert 0.5 * packed < size < 1.1 * packed, (flavor, size, packed)
