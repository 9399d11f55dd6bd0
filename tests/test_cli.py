"""The CLI on the real stories260K checkpoint: compile, inspect, eval, passes, and bad input."""
import json
import shutil
import subprocess
import sys

import pytest

from lowbit.tools.cli import main
from models import DATA, STORIES, need_data
from models import run_cli as run

TEXT = DATA / "tinystories" / "valid-snippet.txt"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    need_data("stories260K", "stories260K.bin")
    out = tmp_path_factory.mktemp("cli") / "w4"
    main(["compile", str(STORIES), "--out", str(out), "--recipe", "w4-rtn-g32-asym", "--verify", "--diff",
          "--calib", str(DATA / "tinyshakespeare" / "input.txt")])
    return out


def test_compile_inspect_eval(artifact, capsys):
    code, out, _ = run(capsys, "inspect", str(artifact), "--json")
    rep = json.loads(out)
    assert code == 0 and rep["pipeline"] == "fold-norms,quantize-weights{method=rtn,bits=4,group=32,sym=false}"
    st = rep["storage"]
    assert st["quantized_linears"] == 35 and 4.6 < st["bits_per_weight"] < 4.7
    assert [p["modified"] for p in rep["passes"]] == [True, True] and "diff" in rep["passes"][1]
    man = rep["manifest"]
    assert man["seed"] == 0 and len(man["calibration"]["sha256"]) == 64 and len(rep["model"]["source_hash"]) == 64
    code, out, _ = run(capsys, "inspect", str(artifact))
    assert code == 0 and "layers.4.mlp.down_proj" in out and "bits/weight" in out

    need_data("tinystories", "valid-snippet.txt")
    code, out, _ = run(capsys, "eval", str(artifact), "--text", str(TEXT), "--max-tokens", "4096", "--json")
    q = json.loads(out)
    code2, out, _ = run(capsys, "eval", str(STORIES), "--text", str(TEXT), "--max-tokens", "4096", "--json")
    fp = json.loads(out)
    assert code == code2 == 0 and q["tokens"] == fp["tokens"] == 4096 and q["ctx"] == 512
    assert 1 < fp["ppl"] < q["ppl"] < fp["ppl"] * 1.5


def test_passes_lists_passes_and_recipes(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0 and "fold-norms" in out and "quantize-weights" in out and "w4-rtn" in out


@pytest.mark.parametrize("argv,match", [
    (["eval", "/nonexistent/model.bin", "--text", str(TEXT)], "no such text file|no such model"),
    (["eval", str(STORIES), "--text", "/nonexistent.txt"], "no such text file"),
    (["eval", str(STORIES), "--text", "{empty}"], "the text is empty"),
    (["eval", str(STORIES), "--text", str(TEXT), "--ctx", "1024"], "ctx 1024 is larger than the model allows"),
    (["compile", str(STORIES), "--out", "{out}", "--recipe", "nope"], "unknown recipe 'nope'"),
    (["compile", str(STORIES), "--out", "{out}", "--passes", "fold-norms,quantize{bits=4}"], "unknown pass 'quantize'"),
    (["compile", "{corrupt}", "--out", "{out}"], "corrupt llama2.c checkpoint"),
    (["inspect", "{out}"], "not a lowbit artifact"),
    (["export", "{out}", "--out", "{out}/m.onnx"], "not a lowbit artifact"),
    (["run", "{out}", "--prompt", "hi", "--backend", "ort"], "runs a lowbit artifact"),
    (["run", str(STORIES), "--prompt", ""], "the prompt is empty"),
    (["bench", "decode", "--accuracy-levels", "4,x", "--out", "{out}"], "levels 0-4"),
    (["compile", str(STORIES), "--out", "{file}"], "exists and is not a directory"),
    (["run", str(STORIES), "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens: must be at least 1, got -5"),
    (["eval", str(STORIES), "--text", str(TEXT), "--ctx", "x"], "--ctx: expected a whole number"),
    (["run", str(STORIES), "--prompt", "hi", "--temperature", "-1"], "--temperature: must be 0 or more"),
    (["compile", str(STORIES)], "the following arguments are required: --out"),
    (["compile", str(STORIES), "--out", "{out}", "--max-memory", "lots"], "--max-memory: expected a size such as 8GB"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_one_line_exit_2_no_artifact(argv, match, capsys, tmp_path):
    need_data("stories260K", "stories260K.bin")
    (tmp_path / "empty.txt").write_text("  \n")
    corrupt = tmp_path / "m" / "model.bin"
    corrupt.parent.mkdir()
    corrupt.write_bytes(STORIES.read_bytes()[:5000])
    shutil.copy(STORIES.parent / "tok512.bin", corrupt.parent)
    (tmp_path / "file").write_text("x")
    subs = {"{empty}": str(tmp_path / "empty.txt"), "{out}": str(tmp_path / "out"), "{corrupt}": str(corrupt),
            "{file}": str(tmp_path / "file")}
    code, out, err = run(capsys, *[subs.get(a, a) for a in argv])
    lines = [ln for ln in err.splitlines() if ln.startswith("lowbit: error")]
    assert code == 2 and len(lines) == 1
    import re
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_sizes_read_as_people_write_them():
    from lowbit.tools.cli import _size
    assert [_size(x) for x in ("8GB", "8g", "512MiB", "2e9", "1.5 GiB")] == [8 * 10**9, 8 * 10**9, 512 * 2**20,
                                                                            2 * 10**9, 3 * 2**29]


def test_existing_output_needs_force(artifact, capsys):
    code, _, err = run(capsys, "compile", str(STORIES), "--out", str(artifact))
    assert code == 2 and "use --force" in err


def test_console_script():
    exe = shutil.which("lowbit") or pytest.skip("lowbit console script not on PATH")
    from lowbit.tools.defaults import DEMO_TEXT   # bundled: the check must not depend on shared data
    p = subprocess.run([exe, "eval", "/nonexistent", "--text", str(DEMO_TEXT)], capture_output=True, text=True)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert p.returncode == 2 and errors == [p.stderr.splitlines()[-1]] and errors[0].startswith("lowbit: error: no such model")
    assert subprocess.run([sys.executable, "-m", "lowbit.tools.cli", "passes"], capture_output=True).returncode == 0


def test_inspect_shows_rotations(capsys, tmp_path):
    need_data("stories260K", "stories260K.bin")
    out = tmp_path / "rot"
    code, _, _ = run(capsys, "compile", str(STORIES), "--out", str(out), "--recipe", "quarot-w4")
    assert code == 0
    code, out_text, _ = run(capsys, "inspect", str(out), "--json")
    rot = json.loads(out_text)["rotations"]
    assert rot["layers.0.self_attn.q_proj"] == ["R1 in"] and rot["lm_head"] == ["R1 in"]
    assert rot["layers.0.self_attn.v_proj"] == ["R1 in", "R2^T out (per head)"]
    assert rot["layers.0.mlp.down_proj"] == ["R1^T out", "R4 in (online Hadamard)"]
    code, text, _ = run(capsys, "inspect", str(out))
    assert "rotations:" in text and "R4 in (online Hadamard)" in text
