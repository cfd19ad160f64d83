"""Detection and background on the real ZTF cut (tests/data/ztf/PROVENANCE.md): sep (the
default) against photutils segmentation, the same filter and threshold."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from ztfpsf import detect
from ztfpsf.detect import detect_stars, estimate_background
from ztfpsf.io.fits import read_exposure
from ztfpsf.selection import select_stars

CUT = Path(__file__).parent / "data" / "ztf" / "cut1024" / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits.gz"


@pytest.fixture(scope="module")
def exposure():
    return read_exposure(CUT)


@pytest.fixture(scope="module")
def both(exposure):
    """{method: (background, detections, selection)}."""
    out = {}
    for method in detect.METHODS:
        bkg = estimate_background(exposure, method=method)
        det = detect_stars(exposure, background=bkg, method=method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sel, _ = select_stars(det, exposure)
        out[method] = bkg, det, sel
    return out


def _match(a, b, xa="x", xb="x"):
    """Distance from each row of ``a`` to the nearest row of ``b``, and its index."""
    ya, yb = xa.replace("x", "y"), xb.replace("x", "y")
    return cKDTree(np.c_[b[xb], b[yb]]).query(np.c_[a[xa], a[ya]])


def test_backgrounds_agree(exposure, both):
    (sep_bkg, *_), (phot_bkg, *_) = both["sep"], both["photutils"]
    good = exposure.usable()
    diff = np.abs(sep_bkg.level - phot_bkg.level)[good] / sep_bkg.median_rms
    ratio = (sep_bkg.rms / phot_bkg.rms)[good]
    # measured: |level difference| median 0.002, 99th percentile 0.09 of the rms; rms ratio
    # median 1.000, 1st-99th percentiles 0.983-1.024
    assert np.median(diff) < 0.01 and np.percentile(diff, 99) < 0.2
    assert np.median(ratio) == pytest.approx(1.0, abs=0.005) and np.all(np.percentile(ratio, [1, 99]) == pytest.approx(1.0, abs=0.05))
    assert sep_bkg.median_level == pytest.approx(155.6, abs=1.0) and sep_bkg.median_rms == pytest.approx(5.80, abs=0.05)


def test_sep_finds_what_photutils_finds(both):
    (_, sep_det, sep_sel), (_, phot_det, phot_sel) = both["sep"], both["photutils"]
    # measured: sep 1095 sources (deblended), photutils 1056; 97.9 % of photutils' within
    # 1 px of one of sep's (the rest: centroids of blends that sep splits)
    assert len(sep_det) > len(phot_det) > 1000
    dist, j = _match(phot_det, sep_det)
    assert np.mean(dist < 1.0) > 0.97
    # the same pixels give the same barycentre and flux for isolated bright sources
    bright = (dist < 1.0) & (phot_det["snr"] > 20)
    assert np.median(np.abs(phot_det["x"][bright] - sep_det["x"][j[bright]])) < 1e-3
    assert np.median(phot_det["flux"][bright] / sep_det["flux"][j[bright]]) == pytest.approx(1.0, abs=1e-3)
    assert sep_det.meta["r50_star"] == pytest.approx(phot_det.meta["r50_star"], rel=0.01)  # 0.765 px
    # selection: measured 87 and 87 stars, 86 in common (sep splits one star's 5 px neighbour)
    dist, _ = _match(sep_sel, phot_sel, "x_init", "x_init")
    assert abs(len(sep_sel) - len(phot_sel)) <= 5 and np.sum(dist < 0.5) >= 0.9 * len(phot_sel)


def test_sep_keeps_faint_neighbours_of_bright_stars(exposure, both):
    """SExtractor's cleaning would drop these 11-14 sigma sources 12-16 px from 14-15 mag
    stars, which would then pass the isolation cut."""
    _, det, sel = both["sep"]
    for (x, y), (nx, ny) in (((370.1, 321.1), (378.5, 332.0)), ((586.0, 514.3), (591.1, 502.5)), ((202.9, 630.6), (213.4, 642.6))):
        assert np.min(np.hypot(det["x"] - nx, det["y"] - ny)) < 0.5
        assert np.min(np.hypot(sel["x_init"] - x, sel["y_init"] - y)) > 5.0


def test_sep_buffer_overflow_retries_then_falls_back(exposure, both, monkeypatch):
    import sep

    bkg, reference, _ = both["sep"]
    real, calls = sep.extract, []

    def full_once(*args, **kwargs):
        calls.append(sep.get_extract_pixstack())
        if len(calls) == 1:
            raise Exception("internal pixel buffer full: The limit of 300000 active object pixels was reached")
        return real(*args, **kwargs)

    monkeypatch.setattr(sep, "extract", full_once)
    det = detect_stars(exposure, background=bkg)
    assert calls[1] == detect._SEP_GROWTH * calls[0] and len(det) == len(reference)
    assert det.meta["method"].startswith("sep")

    def always_full(*args, **kwargs):
        raise Exception("object deblending overflow")

    monkeypatch.setattr(sep, "extract", always_full)
    det = detect_stars(exposure, background=bkg)
    assert det.meta["method"].startswith("photutils") and len(det) == len(both["photutils"][1])
    with pytest.raises(ValueError, match="method"):
        detect_stars(exposure, method="daofind")
