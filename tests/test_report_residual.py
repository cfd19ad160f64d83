"""The report's thumbnail of the residual image (``<stem>.residual.fits``, written by
``ztfpsf catalog --residual-image``): shown beside the data on one stretch, its pixels the
FITS file's block means."""

import base64
import shutil
import struct
from html.parser import HTMLParser

import numpy as np
import pytest
from astropy.io import fits

from ztfpsf.catalog import write_residual
from ztfpsf.io.results import result_paths
from ztfpsf.plots import pixel_size, read_image
from ztfpsf.plots.residual_image import block_mean, compute_residual_image, plot_residual_image, thumbnail_factor
from ztfpsf.report import RESIDUAL_TITLE, write_report

from simrun import STEM


class _Images(HTMLParser):
    """``(title of the preceding <h3>, src)`` of every <img>, and every src/href."""

    def __init__(self):
        super().__init__()
        self.images, self.refs, self._h3, self._title = [], [], False, None

    def handle_starttag(self, tag, attrs):
        self._h3 = tag == "h3"
        for name, value in attrs:
            if name in ("src", "href"):
                self.refs.append(value)
            if tag == "img" and name == "src":
                self.images.append((self._title, value))

    def handle_data(self, data):
        if self._h3:
            self._title = data

    def handle_endtag(self, tag):
        self._h3 = False


def _png_size(src):
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def run_with_residual(sim_run, tmp_path_factory):  # noqa: F811
    """The simulated run's outputs in a folder with a residual image: the data less 90 % of
    its starlight (as if the fit had missed a tenth), a few NaN pixels and one NaN block."""
    out = tmp_path_factory.mktemp("with_residual")
    for p in sim_run.paths.values():
        if p.is_file() and not p.name.endswith(".html"):
            shutil.copy(p, out / p.name)
    image_path = sim_run.out_dir / "input" / f"{STEM}.fits"
    data = fits.getdata(image_path).astype(np.float64)
    residual = data - 0.9 * (data - np.median(data))
    residual[10, 11] = residual[100, 201] = np.nan
    residual[40:42, 60:62] = np.nan  # a whole 2x2 block
    path = result_paths(out, STEM)["residual"]
    write_residual(residual, fits.getheader(image_path), path)
    return out, path, data


def test_report_shows_the_residual_thumbnail(run_with_residual):
    out, path, _ = run_with_residual
    assert path.name == f"{STEM}.residual.fits"
    report = write_report(out, STEM, worst=1, typical=0)
    parser = _Images()
    parser.feed(report.read_text(encoding="utf-8"))
    assert all(r.startswith("data:") for r in parser.refs)  # still self-contained
    titles = [t for t, _ in parser.images]
    # maps, fit quality, loss, the residual image, 1 worst star
    assert len(titles) == 5 and titles.count(RESIDUAL_TITLE) == 1
    src = dict(parser.images)[RESIDUAL_TITLE]
    assert _png_size(src) == pixel_size("residual_image")
    # without the residual file: no thumbnail
    path_moved = path.with_name("elsewhere.fits")
    path.rename(path_moved)
    try:
        parser = _Images()
        parser.feed(write_report(out, STEM, worst=1, typical=0).read_text(encoding="utf-8"))
        assert len(parser.images) == 4 and RESIDUAL_TITLE not in [t for t, _ in parser.images]
    finally:
        path_moved.rename(path)


def test_thumbnail_pixels_are_the_residual_block_means(run_with_residual):
    _, path, data = run_with_residual
    residual = fits.getdata(path).astype(np.float64)  # float32 on disk
    values = compute_residual_image(read_image(path), data)
    # 300x300 px: 2x2 blocks (the longest side at most 256), the mean of each block's finite pixels
    assert values["factor"] == thumbnail_factor(residual.shape) == 2
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"):  # the NaN block
        expected = np.nanmean(residual.reshape(150, 2, 150, 2), axis=(1, 3))
    np.testing.assert_allclose(values["residual"], expected, rtol=1e-12, equal_nan=True)
    assert np.isnan(values["residual"][20, 30]) and np.isfinite(values["residual"][5, 5])  # the NaN block; one NaN pixel of four
    np.testing.assert_allclose(values["residual"][5, 5], np.nanmean(residual[10:12, 10:12]), rtol=1e-12)
    np.testing.assert_allclose(values["data"], data.reshape(150, 2, 150, 2).mean(axis=(1, 3)), rtol=1e-12)
    # one stretch: median -5 to +10 robust sigma of the residual thumbnail
    v = values["residual"][np.isfinite(values["residual"])]
    sigma = 1.4826 * np.median(np.abs(v - np.median(v)))
    assert values["vmin"] == pytest.approx(np.median(v) - 5 * sigma) and values["vmax"] == pytest.approx(np.median(v) + 10 * sigma)
    # what the figure draws: those arrays, both panels on that stretch
    fig = plot_residual_image(values)
    shown = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(shown) == 2
    np.testing.assert_array_equal(np.ma.filled(shown[0].get_array(), np.nan), values["data"])
    np.testing.assert_array_equal(np.ma.filled(shown[1].get_array(), np.nan), values["residual"])
    assert shown[0].get_clim() == shown[1].get_clim() == (values["vmin"], values["vmax"])


def test_block_mean_pads_with_nan():
    a = np.arange(35, dtype=float).reshape(5, 7)
    m = block_mean(a, 3)
    assert m.shape == (2, 3)
    assert m[0, 0] == a[:3, :3].mean() and m[1, 2] == a[3:, 6:].mean() and m[1, 1] == a[3:, 3:6].mean()
    assert thumbnail_factor((3080, 3072)) == 13 and thumbnail_factor((100, 80)) == 1
    with pytest.raises(ValueError, match="2-D"):
        block_mean(np.zeros(4), 2)
    # the data of another shape is left out, with a note
    v = compute_residual_image(np.zeros((10, 10)), np.zeros((10, 12)))
    assert v["data"] is None and "10x10" in v["note"]
