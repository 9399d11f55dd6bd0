import json

import pytest
import torch

from lowbit.ir.artifact import load_artifact, save_artifact
from lowbit.ir.errors import LowbitError
from lowbit.ir.printer import format_ir
from lowbit.passes import PassManager
from lowbit.tools.report import artifact_storage, storage


def test_round_trip_exact(stories_ir, tmp_path):
    PassManager("fold-norms,quantize-weights{bits=4,group=32,sym=false}").run(stories_ir)
    save_artifact(stories_ir, tmp_path / "a", {"seed": 0})
    back = load_artifact(tmp_path / "a")
    x = torch.randint(0, 512, (2, 40))
    assert torch.equal(back(x), stories_ir(x))
    assert format_ir(back) == format_ir(stories_ir)
    assert back.tokenizer.encode("Once upon a time") == stories_ir.tokenizer.encode("Once upon a time")
    assert artifact_storage(tmp_path / "a") == storage(stories_ir)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["pipeline"] == "fold-norms,quantize-weights{bits=4,group=32,sym=false}"
    assert [p["pass"] for p in man["passes"]] == ["fold-norms", "quantize-weights{bits=4,group=32,sym=false}"]


def test_interrupted_save_leaves_nothing(stories_ir, tmp_path, monkeypatch):
    import lowbit.ir.artifact as art

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(art, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(stories_ir, tmp_path / "a", {})
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_detects_corruption(stories_ir, tmp_path):
    save_artifact(stories_ir, tmp_path / "a", {})
    with pytest.raises(LowbitError, match="exists and is not empty"):
        save_artifact(stories_ir, tmp_path / "a", {})
    (tmp_path / "a" / "weights.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(LowbitError, match="corrupt artifact"):
        load_artifact(tmp_path / "a")
