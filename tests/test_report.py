"""`lowbit report`: a self-contained HTML page with its plots inline, opened in a real headless
Chromium (Debian's package) where one is installed."""
import json
import re
import shutil
import subprocess

import pytest

from lowbit.tools import api
from lowbit.tools.bench import bench_quality
from lowbit.tools.html_report import pareto
from models import DATA, STORIES, need_data, run_cli

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'lowbit[report]')")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    need_data("stories260K", "stories260K.bin")
    text, calib = need_data("tinystories", "valid-snippet.txt"), DATA / "tinystories" / "train-head.txt"
    d = tmp_path_factory.mktemp("report")
    art = d / "art"
    api.compile(str(STORIES), passes="fold-norms,fuse-rotations,split-outliers{fraction=0.01,sensitive=0},"
                "quantize-weights{method=gptq,bits=4,group=32,samples=4}", calib=calib, out=art, progress=False)
    bench_quality(str(STORIES), str(text), str(calib), ["w4-rtn-sym", "w4-rtn-perchannel"], [], d / "bench",
                  max_tokens=2048, log=lambda m: None)
    return d, art


def test_report_page_holds_every_plot(page, tmp_path, capsys):
    d, art = page
    out = tmp_path / "r.html"
    code, _, err = run_cli(capsys, "report", str(art), "--html", str(out), "--bench", str(d / "bench"))
    assert code == 0, err
    html = out.read_text()
    sections = re.findall(r"<h2>(.*?)</h2>", html)
    assert sections == ["Artifact", "Passes", "Weight SQNR per linear", "Bits per weight per linear",
                        "Outliers per linear", "Input statistics per linear (GPTQ Hessians)",
                        "Quality against size (bench quality)"]
    assert html.count("<svg") == 6 and not re.search(r"src=|<link|href=.http", html)   # nothing fetched
    assert "layers.4.mlp.down_proj" in html or "down_proj" in html
    code, _, err = run_cli(capsys, "report", str(art), "--bench", str(tmp_path))
    assert code == 2 and "no quality.json" in err


def test_pareto_front():
    rows = [{"name": "fp", "kind": "fp", "ppl": 1.0, "bits_per_weight": 32},
            {"name": "a", "kind": "lowbit", "ppl": 5.0, "bits_per_weight": 4.0},
            {"name": "b", "kind": "peer", "ppl": 6.0, "bits_per_weight": 4.5},   # beaten by a on both
            {"name": "c", "kind": "peer", "ppl": 7.0, "bits_per_weight": 3.0},
            {"name": "d", "kind": "peer", "ppl": None, "bits_per_weight": None, "skipped": "x"}]
    assert [r["name"] for r in pareto(rows)] == ["c", "a"]


def test_report_opens_in_headless_chromium(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    from matplotlib.image import imread
    d, art = page
    out = tmp_path / "r.html"
    api_out = run_report(art, out, d / "bench")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", api_out.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 6 and "Quality against size" in dom   # parsed, every plot in the document
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,6000", f"--screenshot={shot}", api_out.as_uri()], capture_output=True,
                   timeout=120, check=True)
    img = imread(shot)[..., :3]
    drawn = (img < 0.9).any(-1)   # not white: text, bars, points, lines
    colors = {tuple(p) for p in (img[drawn] * 16).astype(int).tolist()}
    assert drawn.mean() > 0.03 and len(colors) > 20, (drawn.mean(), len(colors))   # plots in color, not a blank page


def run_report(art, out, bench):
    from lowbit.tools.html_report import write
    return write(art, out, str(bench))
