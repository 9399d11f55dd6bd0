"""The library API (lowbit.tools.api): the example in its docstring runs as written."""
import os
import re

from lowbit.tools import api
from models import DATA, need_data


def test_docstring_example_runs(tmp_path, capsys):
    need_data("stories260K", "stories260K.bin")
    need_data("tinystories", "valid-snippet.txt")
    code = "\n".join(line[4:] for line in api.__doc__.splitlines() if line.startswith("    "))
    assert "api.compile(" in code and "api.export(" in code
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for d in ("stories260K", "tinystories"):
            os.symlink(DATA / d, tmp_path / d)
        exec(compile(code, "api.__doc__", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.splitlines()
    assert 1 < float(out[0]) < 20 and len(out[1].split()) >= 5   # perplexity, then the continuation
    assert (tmp_path / "stories-w4" / "graph.json").is_file() and (tmp_path / "stories-w4.onnx").is_file()


def test_compile_refuses_bad_requests_before_loading(tmp_path):
    import pytest

    from lowbit.ir.errors import LowbitError
    (tmp_path / "file").write_text("x")
    with pytest.raises(LowbitError, match="exists and is not a directory"):
        api.compile("no-such-model", out=tmp_path / "file")
    with pytest.raises(LowbitError, match=re.escape("'fuse-rotations' needs fold-norms before it")):
        api.compile("no-such-model", passes="fuse-rotations")
    with pytest.raises(LowbitError, match="max_new_tokens must be at least 1"):
        api.run("no-such-model", "hi", max_new_tokens=0)
    for device in ("mps", "tpu"):   # a device torch knows, one it does not
        with pytest.raises(LowbitError, match=f"--device {device}: compile runs on cpu or cuda"):
            api.compile("no-such-model", "w4-rtn", device=device)
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="--device cuda: torch sees no CUDA device"):
            api.compile("no-such-model", "w4-rtn", device="cuda")
