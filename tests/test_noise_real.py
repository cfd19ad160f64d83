"""The noise model on the real ZTF cut (tests/data/ztf/PROVENANCE.md): blank sky is noisier
than the header's gain and read noise predict, and the measured model puts that right.

Forced fits (flux and background free; position and shape fixed at the image's typical
PSF) at blank-sky positions measure the scatter of flux/flux_err, which is 1 when the
noise model is right: with the header model it is the measured/predicted sky rms ratio.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.stats import mad_std
from scipy.spatial import cKDTree

from ztfpsf import fit_stamps
from ztfpsf.detect import detect_stars, estimate_background
from ztfpsf.io.fits import read_exposure
from ztfpsf.selection import select_stars
from ztfpsf.stamps import cut_stamps, noise_model

CUT = Path(__file__).parent / "data" / "ztf" / "cut1024" / "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits.gz"
STAMP = 17
# blank sky: points of a GRID_PX grid with no detection within BLANK_PX (the PSF's FWHM is
# 0.8 px) and no masked pixel in the stamp; a finer grid (overlapping stamps, but the flux
# estimates hardly share pixels) halves the sampling scatter of the robust std to ~1 %
GRID_PX, BLANK_PX = 8, 15


@pytest.fixture(scope="module")
def cut():
    exp = read_exposure(CUT)
    bkg = estimate_background(exp)
    det = detect_stars(exp, background=bkg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel, _ = select_stars(det, exp)
    return exp, bkg, det, sel


def _fit(stamps, exposure, noise, fixed=None):
    """Free fits from the stamps' positions, or forced fits with ``fixed`` (positions in it)."""
    start = {} if fixed else {"x_init": stamps.x_init, "y_init": stamps.y_init}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_stamps(stamps.data, mask=stamps.mask, saturation=exposure.saturation, origin=stamps.origin, fixed=fixed, **start, **noise)


def _blank_stamps(exp, bkg, det):
    ny, nx = exp.shape
    gy, gx = np.mgrid[STAMP : ny - STAMP : GRID_PX, STAMP : nx - STAMP : GRID_PX]
    gx, gy = gx.ravel().astype(float), gy.ravel().astype(float)
    dist, _ = cKDTree(np.c_[det["x"], det["y"]]).query(np.c_[gx, gy])
    stamps = cut_stamps(exp, gx[dist > BLANK_PX], gy[dist > BLANK_PX], STAMP, background=bkg)
    clean = ~stamps.bad.any(axis=(1, 2))
    return cut_stamps(exp, stamps.x_init[clean], stamps.y_init[clean], STAMP, background=bkg)


def test_sky_is_noisier_than_the_header_says(cut):
    exp, bkg, _, sel = cut
    assert exp.gain == 6.0 and exp.read_noise == 9.0
    stamps = cut_stamps(exp, sel["x_init"], sel["y_init"], STAMP, background=bkg)
    noise, info = noise_model(exp, stamps, bkg)
    assert info["model"] == "measured" and set(noise) == {"gain", "read_noise"}
    # measured: sky 155.6 ADU, rms 5.80 ADU against sqrt(155.6/6 + 1.5^2) = 5.31 from the header
    assert info["sky_level"] == pytest.approx(155.6, abs=1.0)
    assert info["sky_rms_header"] == pytest.approx(np.sqrt(info["sky_level"] / 6.0 + 1.5**2), rel=0.01)
    assert 1.05 < info["rms_ratio"] < 1.15  # measured 1.093
    # the effective read noise restores the measured sky variance at each star
    rn = noise["read_noise"]
    c = STAMP // 2
    np.testing.assert_allclose(stamps.sky / 6.0 + (rn / 6.0) ** 2, stamps.sky_rms[:, c, c] ** 2, rtol=1e-5)
    header, hinfo = noise_model(exp, stamps, bkg, mode="header")
    assert header == {"gain": 6.0, "read_noise": 9.0} and hinfo["model"] == "header"
    assert hinfo["rms_ratio"] == info["rms_ratio"]


def test_blank_sky_flux_errors(cut):
    exp, bkg, det, sel = cut
    stars = cut_stamps(exp, sel["x_init"], sel["y_init"], STAMP, background=bkg)
    noise, _ = noise_model(exp, stars, bkg)
    fit = _fit(stars, exp, noise)
    good = fit["flags"] == 0
    assert good.sum() >= 80  # measured 89 of 93
    shape = {"fwhm": float(np.median(fit["fwhm"][good])), "alpha": float(np.median(fit["alpha"][good]))}
    blank = _blank_stamps(exp, bkg, det)
    assert len(blank) > 6000  # measured 7221
    fixed = dict(shape, x=blank.x_init, y=blank.y_init)
    scatter = {}
    for mode in ("measured", "header"):
        kwargs, _ = noise_model(exp, blank, bkg, mode=mode)
        forced = _fit(blank, exp, kwargs, fixed)
        ok = np.asarray(forced["flags"]) == 0
        assert ok.mean() > 0.999  # float32: 1 of 7,149 header-noise fits ends NOT_CONVERGED
        scatter[mode] = mad_std(np.asarray(forced["flux"] / forced["flux_err"])[ok])
    # measured: 0.998 with the measured sky noise, 1.084 with the header's (0.995-1.028 and
    # 1.084-1.118 on other grids)
    assert 0.95 < scatter["measured"] < 1.05
    assert 1.05 < scatter["header"] < 1.20
    assert scatter["header"] / scatter["measured"] == pytest.approx(1.09, abs=0.03)


def test_pipeline_writes_the_noise_model(tmp_path):
    from ztfpsf.cli import main
    from ztfpsf.io.results import read_json
    from ztfpsf.pipeline import output_paths

    summaries = {}
    for mode in ("measured", "header"):
        out = tmp_path / mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["-q", "fit", str(CUT), "--out", str(out), "--noise", mode]) == 0
        summaries[mode] = read_json(output_paths(CUT, out)["summary"])
    measured, header = summaries["measured"]["noise"], summaries["header"]["noise"]
    assert measured["model"] == "measured" and header["model"] == "header"
    for noise in (measured, header):  # the same sky measurement either way
        assert noise["sky_rms_measured"] == pytest.approx(5.80, abs=0.05)
        assert noise["sky_rms_header"] == pytest.approx(5.31, abs=0.05)
        assert noise["rms_ratio"] == pytest.approx(1.093, abs=0.01)
    assert measured["read_noise_effective"] == pytest.approx(17.0, abs=1.0) and header["read_noise_header"] == 9.0
    # the stars' chi2/dof: measured 1.56 and 1.80 (the sky-dominated pixels are 1.19x more variable
    # than the header says; the rest of the excess: the undersampled 0.8 px PSF)
    chi2 = {mode: s["chi2_dof_median"] for mode, s in summaries.items()}
    assert chi2["measured"] < chi2["header"] / 1.1
