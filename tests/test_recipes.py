"""Every shipped recipe end to end on stories260K: it compiles with calibration text and the
compiled model stays close to FP: logits SQNR above 8 dB (measured from 9.3 dB for w3-rtn and
13.6 for w4a4kv4 to 42-43 dB for the int8 recipes; a broken quantizer lands near 0)."""
import copy
import re

import pytest
import torch

from lowbit.passes import RECIPES, PassContext, PassManager
from lowbit.passes.instruments import sqnr_db
from lowbit.tools.evaluate import read_text, windows
from models import DATA, need_data


@pytest.fixture(scope="module")
def calib(_stories_captured):
    need_data("tinystories", "train-head.txt")
    return windows(_stories_captured.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 16 * 512)


FLAVORS = ("ort", "qdq", "trt")


def _flavors(i: int, name: str):
    """Each recipe exports in one flavor in the default run (taking turns, so every flavor is
    covered), in all three under the `slow` marker; weights with an fp16 group minimum have only
    MatMulNBits' form (ort)."""
    if "offset=min" in RECIPES[name][0]:
        return [pytest.param(("ort",), id="ort")]
    return [pytest.param(FLAVORS, marks=pytest.mark.slow, id="all-flavors"), pytest.param((FLAVORS[i % 3],), id=FLAVORS[i % 3])]


@pytest.mark.parametrize("name,flavors", [(n, f.values[0]) if not f.marks else pytest.param(n, f.values[0], marks=f.marks, id=f"{n}-all")
                                          for i, n in enumerate(RECIPES) for f in _flavors(i, n)])
def test_recipe_end_to_end(name, flavors, _stories_captured, calib, tmp_path_factory):
    ir = copy.deepcopy(_stories_captured)
    x = calib[:2, :128]
    ref = ir(x)
    # fewer learning steps than shipped: the test is that the recipe runs, not how well it learns
    text = re.sub(r"learn-rotations\{steps=\d+", "learn-rotations{steps=3", RECIPES[name][0])
    PassManager(text).run(ir, PassContext(calib=calib))
    got = ir(x)
    assert torch.isfinite(got).all()
    db = sqnr_db(ref, got)
    assert db > 8
    _exports(ir, x, got, tmp_path_factory.mktemp(name), flavors)


def _exports(ir, x, got, tmp, flavors):
    """The compiled recipe exports as a KV-cache decoder; onnxruntime runs the ort and qdq files
    above 30 dB SQNR against the reference, or exact at most positions (a wrong graph lands near 0
    dB everywhere). The embedding stays fp32 here:
    with 4-bit activation quantizers, fp16's rounding of it flips enough codes to reach 17 dB on
    this tiny model, though the graph is exact (6e-7 relative with fp32)."""
    import onnx

    from lowbit.backends.onnx import OrtBackend, export_onnx
    for flavor in flavors:
        path = export_onnx(ir, tmp / f"{flavor}.onnx", flavor, accuracy_level=0, half_embedding=False)
        onnx.checker.check_model(onnx.load(path), full_check=True)
        if flavor != "trt":   # trt's lowbit-domain nodes run in TensorRT through the plugins
            ort = OrtBackend(path, optimize=False).logits(x)
            # with 4-bit activation and KV quantizers a 1-ulp difference can flip one code, and a
            # flipped KV code changes every later token of its sequence (measured: w4a4kv4-learned
            # 25.7 dB overall, sequence 0 exact to 135 dB up to position 16 and 18-30 dB after it,
            # sequence 1 exact); so either close overall, or most positions exact
            per_token = torch.tensor([sqnr_db(a, b) for a, b in zip(got.flatten(0, 1), ort.flatten(0, 1))])
            assert sqnr_db(got, ort) > 30 or per_token.median() > 100, flavor
