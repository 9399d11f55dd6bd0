"""The llama2.c loader and tokenizer against straightforward reference implementations."""
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.ir.errors import LowbitError
from lowbit.ir.llama2c import Llama2cTokenizer, load_llama2c
from models import STORIES, need_data


def run_c_encode(tok, text):
    """llama2.c run.c's encode, literally: O(n^2) scan for the best pair, leftmost on ties."""
    if not text:
        return []
    ids = [tok.lookup[b" "]]
    for ch in text:
        b = ch.encode()
        ids += [tok.lookup[b]] if b in tok.lookup else [x + 3 for x in b]
    while True:
        best, at = -1e10, -1
        for i in range(len(ids) - 1):
            m = tok.lookup.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if m is not None and tok.scores[m] > best:
                best, at, merged = tok.scores[m], i, m
        if at < 0:
            return ids
        ids[at:at + 2] = [merged]


@pytest.fixture(scope="module")
def tok():
    need_data("stories260K", "tok512.bin")
    return Llama2cTokenizer(STORIES.parent / "tok512.bin")


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcdeilnorst ,.!?\n'\"AOT") + ["é", "漢", "🙂"]), max_size=60))
def test_encode_matches_run_c(tok, text):
    ids = tok.encode(text)
    assert ids == run_c_encode(tok, text)
    assert tok.decode(ids) == text


def test_encode_real_text(tok):
    need_data("tinystories", "valid-snippet.txt")
    text = (STORIES.parents[1] / "tinystories" / "valid-snippet.txt").read_text()[:3000]
    assert tok.encode(text) == run_c_encode(tok, text)


def _write_ckpt(path, header, floats):
    path.write_bytes(struct.pack("<7i", *header) + torch.tensor(floats, dtype=torch.float32).numpy().tobytes())


def test_corrupt_and_nan_checkpoints(tmp_path):
    from lowbit.ir.load import load_model
    need_data("stories260K", "stories260K.bin")
    raw = STORIES.read_bytes()
    (tmp_path / "tok512.bin").write_bytes((STORIES.parent / "tok512.bin").read_bytes())
    (tmp_path / "short.bin").write_bytes(raw[:-4])
    with pytest.raises(LowbitError, match=r"corrupt llama2.c checkpoint .*header implies"):
        load_llama2c(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(raw[:10])
    with pytest.raises(LowbitError, match="shorter than its header"):
        load_llama2c(tmp_path / "tiny.bin")
    bad = bytearray(raw)
    bad[28 + 4 * 1000:28 + 4 * 1001] = struct.pack("<f", float("nan"))
    (tmp_path / "nan.bin").write_bytes(bytes(bad))
    with pytest.raises(LowbitError, match="contains NaN or Inf"):
        load_model(str(tmp_path / "nan.bin"))
