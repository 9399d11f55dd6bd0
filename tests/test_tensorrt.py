"""TensorRT engines (backends/tensorrt.py): only where TensorRT is installed (marker tensorrt)."""
import pytest

from lowbit.backends.onnx import export_onnx
from lowbit.passes import PassManager
from models import tiny_ir

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")


@pytest.mark.tensorrt
def test_int4_qdq_graph_builds_an_engine(tmp_path):
    from lowbit.backends.tensorrt import build_engine
    ir, _ = tiny_ir("llama")
    PassManager("quantize-weights{bits=4,group=32,sym=true}").run(ir)
    engine = build_engine(export_onnx(ir, tmp_path / "m.onnx", "trt"), tmp_path / "m.engine", max_seq=64)
    assert engine.stat().st_size > 0
