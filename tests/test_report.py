"""The HTML report: self-contained, holds counts, decoded flags, worst fits and figures;
renders in headless Chromium (screenshot checked to be non-blank)."""

import base64
import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

from ztfpsf.cli import main as cli_main
from ztfpsf.flags import BAD, Flag, decode, meaning
from ztfpsf.plots import pixel_size, read_results
from ztfpsf.report import find_stems, write_report

from simrun import STEM


class _Refs(HTMLParser):
    """Every src/href attribute, every <img>, and whether any <script> or <link> exists."""

    def __init__(self):
        super().__init__()
        self.refs, self.images, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data"):
                self.refs.append(value)
            if tag == "img" and name == "src":
                self.images.append(value)


@pytest.fixture(scope="module")
def report(sim_run):  # noqa: F811
    path = write_report(sim_run.out_dir, STEM, worst=3, typical=1)
    parser = _Refs()
    text = path.read_text(encoding="utf-8")
    parser.feed(text)
    return path, text, parser


def _png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_is_self_contained(report):
    path, text, parser = report
    assert path.name == f"{STEM}.report.html"
    external = [r[:40] for r in parser.refs if not r.startswith("data:")]
    assert parser.refs and not external, external
    assert not parser.tags & {"script", "link", "iframe"}
    assert "url(" not in text and "@import" not in text
    sizes = [_png_size(base64.b64decode(src.split(",", 1)[1])) for src in parser.images]
    # maps, fit quality, loss, 3 worst and 1 typical star
    assert len(sizes) == 7
    assert sizes[:3] == [pixel_size("maps"), pixel_size("residuals"), pixel_size("loss")]
    assert sizes[3:] == [pixel_size("star")] * 4


def test_report_contents(sim_run, report):  # noqa: F811
    _, text, _ = report
    summary = json.loads(sim_run.paths["summary"].read_text())
    table = read_results(sim_run.paths["stars"])
    for cut, n in summary["counts"].items():
        assert f"<td class=\"l\">{cut}</td><td>{n}</td>" in text
    assert f"<td class=\"l\"><b>n_fitted</b></td><td>{summary['n_fitted']}</td>" in text
    # every flag bit that occurs, decoded, with its meaning and count
    flags = np.asarray(table["flags"], np.int64)
    present = {name for v in flags for name in decode(v)}
    assert {"MASKED_PIXELS"} <= present and present & {"NO_SOURCE", "FIT_FAILED"}
    for name in present:
        count = int(np.sum((flags & Flag[name]) != 0))
        assert f"<code>{name}</code></td><td>{int(Flag[name])}</td><td>{count}</td>" in text
        assert meaning(Flag[name]).replace("'", "&#x27;") in text
    # the worst fits: the 3 largest chi2/dof of stars with values, in order
    rchi2 = np.asarray(table["chi2"]) / np.asarray(table["dof"])
    good = np.nonzero((flags & int(BAD)) == 0)[0]
    worst = good[np.argsort(-rchi2[good])][:3]
    section = text[text.index("Worst fits"):text.index("Figures")]
    positions = [section.index(f"<td>{table['id'][i]}</td>") for i in worst]
    assert positions == sorted(positions)
    for i in worst:
        assert f"worst star {table['id'][i]}" in text
    assert f"{table['id'][40]} (<code>" in section  # the star without values is listed
    assert "median fwhm [px]" in text and f"{summary['fwhm_median_px']:.4g}" in text
    assert "status ok" in text


def test_failed_run_report(tmp_path):
    summary = {"image": "/data/bad.fits", "stem": "bad", "status": "failed",
               "error": "ValueError: /data/bad.fits: no 2-D image in any HDU", "counts": {}, "timings": {"read": 0.01}}
    (tmp_path / "bad.summary.json").write_text(json.dumps(summary))
    path = write_report(tmp_path, "bad")
    text = path.read_text()
    assert "status failed" in text and "no 2-D image in any HDU" in text and "<img" not in text
    with pytest.raises(FileNotFoundError, match="no other.summary.json or other.stars.parquet"):
        write_report(tmp_path, "other")


def test_cli_report(tmp_path, sim_run, capsys):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    for p in sim_run.paths.values():
        if p.is_file() and not p.name.endswith(".html"):
            shutil.copy(p, out / p.name)
    (out / "broken.summary.json").write_text("{not json")
    assert find_stems(out) == ["broken", STEM]
    rc = cli_main(["report", str(out), "--worst", "1", "--typical", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1  # one image's report failed, the other was written
    assert lines[0].startswith("broken: report not written: ") and "not valid JSON" in lines[0]
    assert lines[1] == str(out / f"{STEM}.report.html")
    assert (out / f"{STEM}.report.html").read_text().count("<img") == 4
    assert cli_main(["report", str(out), "--stem", STEM, "--worst", "0", "--typical", "0"]) == 0
    assert "<img" in (out / f"{STEM}.report.html").read_text()
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _screenshot(browser, html, tmp_path, height):
    """A headless-Chromium screenshot of a local HTML file, as an RGB array."""
    from PIL import Image

    shot = tmp_path / f"{html.stem}.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--window-size=1400,{height}", f"--screenshot={shot}",
           html.resolve().as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env)
    assert shot.is_file(), f"no screenshot; chromium said: {proc.stderr[-2000:]}"
    return np.asarray(Image.open(shot).convert("RGB"), dtype=float)


def test_report_renders_in_headless_chromium(tmp_path, report):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run installs it when run as root)")
    path, text, _ = report
    # the same page with every figure's data removed: what the text, tables and badge draw alone
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r'src="data:image/png;base64,[^"]*"', 'src=""', text), encoding="utf-8")
    height = 6000  # tall enough for the tables and the figures below them
    img = _screenshot(browser, path, tmp_path, height)
    assert img.shape == (height, 1400, 3)
    assert img.mean(axis=2).std() > 20, "screenshot is blank"
    # figures were decoded and drawn: strongly coloured (viridis / RdBu) pixels, far more than the page
    # without them has (the status badge only)
    colourful = ((img.max(axis=2) - img.min(axis=2)) > 60).sum()
    without = _screenshot(browser, bare, tmp_path, height)
    colourful_without = ((without.max(axis=2) - without.min(axis=2)) > 60).sum()
    assert colourful > 20 * max(colourful_without, 1) and colourful > 0.01 * img[..., 0].size, (colourful, colourful_without)
