"""split-outliers (SqueezeLLM's dense-and-sparse) and the sparse format's CSR layout."""
import pytest
import torch

from lowbit.ir.formats.sparse import csr_rows, to_csr
from lowbit.passes import PassContext, PassManager
from lowbit.tools.evaluate import read_text, windows
from models import DATA, need_data


@pytest.fixture(scope="module")
def calib(_stories_captured):
    need_data("tinystories", "train-head.txt")
    return windows(_stories_captured.tokenizer.encode(read_text(DATA / "tinystories" / "train-head.txt")), 512, 8 * 512)


def test_csr_layout():
    w = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    crow, col, val = to_csr(w != 0, w)
    assert crow.tolist() == [0, 1, 1, 3] and col.tolist() == [1, 0, 2] and val.tolist() == [2.0, 3.0, 4.0]
    assert crow.dtype == col.dtype == torch.int32 and val.dtype == torch.float16
    assert csr_rows(crow).tolist() == [0, 2, 2]


def test_split_outliers_is_exact_and_picks_sensitive_and_large(stories_ir, calib):
    from lowbit.passes.sensitivity import fisher
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = stories_ir(x)
    ctx = PassContext(calib=calib)
    fish = fisher(stories_ir, ctx, 8)
    orig = {lin.node.name: stories_ir.tensor(lin.weight).clone() for lin in stories_ir.analysis.linears.values()}
    pm = PassManager("split-outliers{fraction=0.01,sensitive=0.002,samples=8}")
    pm.run(stories_ir, ctx)
    res = stories_ir.stats[-1]
    assert torch.equal(stories_ir(x), ref)     # D + S is W, bit for bit
    s = stories_ir.analysis
    for lin in s.linears.values():
        if lin is s.lm_head:
            assert lin.sparse is None
            continue
        w = orig[lin.node.name]
        crow, col, val = (stories_ir.tensor(t) for t in lin.sparse)
        rows, cols = csr_rows(crow), col.long()
        assert len(val) == round(0.002 * w.numel()) + round(0.008 * w.numel())
        dense = stories_ir.tensor(lin.weight)
        moved = torch.zeros_like(w, dtype=torch.bool)
        moved[rows, cols] = True
        assert torch.equal(dense[~moved], w[~moved])
        # the most sensitive values moved, and every value left is no larger than those moved for size
        sensitive = torch.zeros(w.numel(), dtype=torch.bool)
        sensitive[fish[lin.node.name].flatten().topk(round(0.002 * w.numel())).indices] = True
        sensitive = sensitive.view_as(w)
        assert moved[sensitive].all()
        assert w[~moved].abs().max() <= w[moved & ~sensitive].abs().min()
    assert res["density"] == pytest.approx(0.01, rel=0.05)
    # idempotent
    assert not PassManager("split-outliers").run(stories_ir, ctx)[0].modified


def test_before_expected():
    """Each linear but lm_head reads lowbit.sparse_add(dense, crow, col, val): its largest values in
    CSR (fp16), the dense remainder holding the rest, exactly."""
    from graphs import NAMES, Tiny, assert_matches, ir_of, weights
    from lowbit.ir.formats.sparse import sparse_add
    w = weights()
    ir = ir_of(Tiny(w))
    PassManager("split-outliers{fraction=0.1,sensitive=0}").run(ir)
    expected = Tiny(w, weight=lambda name, m: m.lin[name] if name == "lm_head" else sparse_add(
        *(getattr(m, f"{name}_{k}") for k in ("dense", "crow", "col", "val"))))
    for name in NAMES[:-1]:
        mask = torch.zeros(w[name].numel(), dtype=torch.bool)
        mask[w[name].abs().flatten().topk(round(0.1 * mask.numel())).indices] = True
        crow, col, val = to_csr(mask.view_as(w[name]), w[name])
        dense = w[name].clone()
        dense[mask.view_as(w[name])] -= val.float()
        for k, t in (("dense", dense), ("crow", crow), ("col", col), ("val", val)):
            expected.register_buffer(f"{name}_{k}", t)
    assert_matches(ir, ir_of(expected), rtol=0)
