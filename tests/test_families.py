"""The family x capability matrix: every row run on a tiny random-weight model of every family
(norm weights and biases perturbed away from 1 and 0, so a folding mistake cannot hide).

A cell either works, to the bound its row states, or is refused with one line naming what the
analysis expected; EXPECTED lists the refusals and partial cells, so a family that starts (or
stops) working fails here until the table says so. `make families` runs this file and writes
docs/families.md from what the cells measured."""
import copy
import functools
import json
import os

import numpy as np
import pytest
import torch

from lowbit.backends.onnx import OrtBackend, export_onnx
from lowbit.ir.errors import LowbitError
from lowbit.passes import PassContext, PassManager
from lowbit.passes.instruments import sqnr_db
from lowbit.tools.generate import TorchDecoder
from models import FAMILIES, MORE_FAMILIES, tiny_ir

ALL = FAMILIES + MORE_FAMILIES
RTN = "quantize-weights{method=rtn,bits=4,group=32,sym=false}"
GPTQ = "quantize-weights{method=gptq,bits=4,group=32,sym=false,samples=4}"
ROTATE = "fold-norms,fuse-rotations{kind=hadamard},insert-hadamard"
W4A8KV8 = f"{ROTATE},{GPTQ},quantize-activations{{bits=8}},quantize-kv{{bits=8}}"
LEARNED = ("fold-norms,learn-rotations{steps=4,calib=4,seq=16,batch=1,loss=local,smooth=true},fuse-rotations{kind=learned},"
           f"insert-hadamard{{kind=learned}},quantize-activations{{bits=8}},quantize-kv{{bits=8}},{RTN}")
ROWS = {
    "capture": "captured graph = transformers' logits (rel. max error)",
    "rtn": "int4 RTN (g32) on every linear: logits SQNR (dB)",
    "gptq": "int4 GPTQ (g32, 4 windows) on every linear: logits SQNR (dB)",
    "rotate": "fold-norms, fuse-rotations, insert-hadamard: exact to 1e-4 (rel. max error)",
    "w4a8kv8": "rotations + int4 GPTQ + 8-bit activations and KV cache: logits SQNR (dB)",
    "learned": "learn-rotations (loss=local, 4 steps; R1, R2, learned R3 and R4, smoothing scales) fused, then "
               "8-bit activations and KV, int4 RTN: logits SQNR (dB)",
    "decode": "the W4A8KV8 model through its KV-cache decoder: prefill then token by token = full sequence "
              "(rel. max error)",
    "onnx": "rotations + int4 RTN exported (MatMulNBits, Hadamards as MatMul factors) in onnxruntime, full and "
            "token by token = reference (rel. max error)",
}
EXPECTED: dict = {}   # (family, row) -> the refusal a cell shows instead of a result
X = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@functools.cache
def _captured(family):
    ir, model = tiny_ir(family)
    with torch.no_grad():
        return ir, model(X).logits


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _steps(dec, ids, prefill):
    """Logits of ids from one prefill call, then one call per token."""
    out, past = dec.step(ids[:, :prefill], np.ones((1, prefill), np.int64), np.arange(prefill)[None], dec.empty_past(1))
    outs = [out]
    for t in range(prefill, ids.shape[1]):
        out, past = dec.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        outs.append(out)
    return torch.from_numpy(np.concatenate(outs, 1))


def _cell(family, row, tmp_path) -> tuple[str, float | None]:
    """(what the cell shows, the number its row bounds) for one family and row."""
    base, ref = _captured(family)
    ir = copy.deepcopy(base)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    if row == "capture":
        err = _rel(ir(X), ref)
        return f"{err:.0e}", err <= 1e-5
    if row in ("rtn", "gptq"):
        n = len(ir.linears.linears)
        PassManager(RTN if row == "rtn" else GPTQ).run(ir, PassContext(calib=calib))
        db = sqnr_db(ref, ir(X))
        assert ir.stats[-1]["linears"] == n - 1 and not ir.stats[-1].get("not_quantized")   # all but lm_head
        return f"{db:.1f} dB", db > 8
    if row == "rotate":
        PassManager(ROTATE).run(ir)
        err = _rel(ir(X), ref)
        return f"{err:.0e}", err <= 1e-4
    if row in ("w4a8kv8", "learned"):
        PassManager(W4A8KV8 if row == "w4a8kv8" else LEARNED).run(ir, PassContext(calib=calib))
        db = sqnr_db(ref, ir(X))
        return f"{db:.1f} dB", db > 8
    ids = X[:1].numpy()
    if row == "decode":
        PassManager(W4A8KV8).run(ir, PassContext(calib=calib))
        full = ir(X[:1])
        steps = _steps(TorchDecoder(ir), ids, 6)
        err = _rel(steps, full)
        # the cache's float rounding (1e-7) can flip one 8-bit activation code at a position (measured on
        # Mixtral with transformers 5.25: 2e-3 there, 1e-6 or less elsewhere): close overall, or at most positions
        per_position = (steps - full).abs().amax(-1).flatten() / full.abs().max()
        return f"{err:.0e}", err <= 1e-4 or (per_position.median() <= 1e-5 and err <= 1e-2)
    PassManager(f"{ROTATE},{RTN}").run(ir)
    full = ir(X[:1])
    path = export_onnx(ir, tmp_path / "m.onnx", "ort", accuracy_level=0, half_embedding=False)
    err = max(_rel(OrtBackend(path).logits(X[:1]), full), _rel(_steps(OrtBackend(path), ids, 6), full))
    return f"{err:.0e}", err <= 2e-5


@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("family", ALL)
def test_family_row(family, row, tmp_path):
    expected = EXPECTED.get((family, row))
    try:
        shown, ok = _cell(family, row, tmp_path)
    except LowbitError as e:
        msg = str(e).splitlines()[0]
        assert expected is not None and expected in msg, msg
        shown, ok = f"refused: {msg}", True
    else:
        assert expected is None, f"{family}/{row} now runs: {shown}"
    assert ok, f"{family}/{row}: {shown}"
    if os.environ.get("LOWBIT_FAMILIES_OUT"):   # `make families`: the cells, for docs/families.md
        with open(os.environ["LOWBIT_FAMILIES_OUT"], "a") as f:
            f.write(json.dumps({"family": family, "row": row, "shown": shown}) + "\n")


def render(cells: list[dict]) -> str:
    """docs/families.md from the cells `make families` recorded."""
    got = {(c["family"], c["row"]): c["shown"] for c in cells}
    missing = [f"{f}/{r}" for f in ALL for r in ROWS if (f, r) not in got]
    if missing:
        raise SystemExit(f"cells not recorded: {', '.join(missing)}")
    notes = {}

    def cell(f, r):
        shown = got[f, r]
        if not shown.startswith("refused: "):
            return shown
        why = shown[len("refused: "):].split("; passes run before")[0].split(" failed: ", 1)[-1]
        notes.setdefault(why, len(notes) + 1)
        return f"refused {'⁰¹²³⁴⁵⁶⁷⁸⁹'[notes[why]]}"
    lines = ["# Families and what runs on them", "",
             "Generated by `make families` from the cells of `tests/test_families.py`, which `make test` runs: "
             "each family is a tiny random-weight model built from its transformers config, with norm weights "
             "and biases moved away from 1 and 0 (`falcon_alibi`: Falcon's config with `alibi=True`). Numbers are "
             "what each cell measured.", "",
             "| family | " + " | ".join(ROWS) + " |", "|---|" + "---:|" * len(ROWS)]
    lines += [f"| {f} | " + " | ".join(cell(f, r) for r in ROWS) + " |" for f in ALL]
    lines += ["", "Rows:", ""] + [f"- **{r}**: {text}" for r, text in ROWS.items()]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {'⁰¹²³⁴⁵⁶⁷⁸⁹'[i]} {why}" for why, i in notes.items()]
    return "\n".join(lines) + "\n"


def test_docs_matrix_is_current():
    """docs/families.md says what EXPECTED says: a cell that changed needs `make families`."""
    from pathlib import Path
    doc = (Path(__file__).parents[1] / "docs" / "families.md").read_text()
    rows = [line.split(" | ") for line in doc.splitlines() if line.startswith("| ") and line[2:].split(" |")[0] in ALL]
    said = {(r[0][2:], row): "refused" in c for r in rows for row, c in zip(ROWS, r[1:])}
    assert said == {(f, r): (f, r) in EXPECTED for f in ALL for r in ROWS}


if __name__ == "__main__":   # python tests/test_families.py CELLS.jsonl > docs/families.md
    import sys
    print(render([json.loads(line) for line in open(sys.argv[1])]), end="")
