"""Forced photometry with the catalogue's grouping (``photometry(..., sources=)``,
``ztfpsf photometry --sources``): the positions measured together with the other sources
near them, on a small crowded simulated image with known truth."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ztfpsf.cli import main
from ztfpsf.flags import Flag
from ztfpsf.photometry import photometry
from ztfpsf.psf import PSFModel
from ztfpsf.simulate import VaryingPSF, make_quadrant

N = 400
SHAPE = dict(fwhm=2.2, alpha=2.8, e1=0.03, e2=-0.02)
COLUMNS = ["id", "x_init", "y_init", "x", "x_err", "y", "y_err", "ra", "dec", "flux", "flux_err", "background",
           "background_err", "fwhm", "mag", "mag_err", "chi2", "dof", "flags"]


@pytest.fixture(scope="module")
def crowded():
    """300 stars of mag 12-21 on 400x400 px (a ZTF quadrant's density, as the blends test of
    test_photometry.py), forced photometry at the true positions of the 160 stars of mag
    14-20: per stamp (today's), and grouped with the simulator's catalogue of every star and
    with sep's detections."""
    q = make_quadrant(seed=5, size=(N, N), nstars=300, psf=VaryingPSF(**SHAPE, size=(N, N)), mask=False, sky=150.0)
    tr = q.truth
    inner = (tr["x"] > 9) & (tr["x"] < N - 10) & (tr["y"] > 9) & (tr["y"] < N - 10)
    pos = tr[(tr["mag"] >= 14) & (tr["mag"] <= 20) & inner]["id", "x", "y", "flux"]
    psf = PSFModel.constant("elliptical_moffat", SHAPE, (-0.5, N - 0.5, -0.5, N - 0.5), image_shape=(N, N))
    kw = dict(gain=q.header["GAIN"], read_noise=q.header["READNOI"], saturation=q.header["SATURATE"],
              zeropoint=q.header["MAGZP"], wcs=WCS(q.header))
    stamps = photometry(q.data, psf, pos["id", "x", "y"], **kw)
    judged = photometry(q.data, psf, pos["id", "x", "y"], neighbours=q.catalog, **kw)
    grouped = photometry(q.data, psf, pos["id", "x", "y"], sources=q.catalog, **kw)
    detected = photometry(q.data, psf, pos["id", "x", "y"], sources="detect", **kw)
    expected = pos["flux"] * psf.enclosed(pos["x"], pos["y"])  # the PSF's flux scale
    return dict(q=q, pos=pos, psf=psf, kw=kw, expected=np.asarray(expected), stamps=stamps, judged=judged, grouped=grouped,
                detected=detected)


def _clean_pulls(t, expected):
    clean = np.asarray(t["flags"]) == 0
    pull = (np.asarray(t["flux"]) - expected) / np.asarray(t["flux_err"])
    bias = np.median(np.asarray(t["flux"])[clean] / expected[clean]) - 1.0
    return clean, pull[clean], bias


def test_grouped_fluxes_unbiased_with_right_errors(crowded):
    """Grouped with the catalogue of the field: more clean rows, with pulls of 1."""
    expected = crowded["expected"]
    clean, pull, bias = _clean_pulls(crowded["grouped"], expected)
    # measured: 151 of 160 unflagged (7 BLENDED, 2 SATURATED), flux pull std 0.969, median flux
    # bias -0.19 % (-0.18 % per stamp: the simulation's), none beyond 3 sigma
    assert 0.9 <= np.std(pull) <= 1.15
    assert abs(bias) < 0.003
    assert np.all(np.abs(pull) < 4)
    assert clean.sum() >= 140
    # per stamp (today's): 90 unflagged alone, 86 with the same catalogue as neighbours to judge
    # blends (pull std 1.07 / 0.90, bias -0.18 % / -0.14 %): the group fit keeps the rows
    # whose neighbours it fitted
    for t in (crowded["stamps"], crowded["judged"]):
        n_stamp = int(np.sum(np.asarray(t["flags"]) == 0))
        assert n_stamp <= 100 and clean.sum() >= n_stamp + 40


def test_grouped_with_detections(crowded):
    """Grouped with sep's detections: the neighbours sep separates are fitted; those merged
    with the star (< 1 FWHM, fainter) stay in its flux, as they do per stamp."""
    expected = crowded["expected"]
    clean, pull, bias = _clean_pulls(crowded["detected"], expected)
    n_stamp = int(np.sum(np.asarray(crowded["stamps"]["flags"]) == 0))
    # measured: 152 unflagged (per stamp: 90), median bias -0.19 %, flux pull std 1.25 from 3
    # rows at 5.0-5.6 sigma, each with a star of mag 20.0-20.4 1.5-2.2 px away that sep merged
    # with it (per stamp one such row of 90 is beyond 5 sigma, at 5.05); the other 149: std 1.01
    assert clean.sum() >= n_stamp + 40
    assert abs(bias) < 0.003
    assert np.sum(np.abs(pull) > 5) <= 0.03 * clean.sum() and np.all(np.abs(pull) < 7)
    assert 0.9 <= np.std(pull[np.abs(pull) < 5]) <= 1.15
    assert crowded["detected"].meta["other_sources"] == "sep detections"


def test_grouped_rows_and_columns(crowded):
    pos, t = crowded["pos"], crowded["grouped"]
    assert t.colnames == COLUMNS + ["group_id", "group_size"]
    assert list(t["id"]) == list(pos["id"])  # the positions only, in their order
    # positions held: the given values exactly, no error
    np.testing.assert_array_equal(t["x"], pos["x"])
    np.testing.assert_array_equal(t["y"], pos["y"])
    assert np.all(t["x_err"] == 0) and np.all(t["y_err"] == 0)
    # neighbours were fitted with them
    assert np.sum(t["group_size"] >= 2) > 30 and t.meta["n_other_sources"] > 100  # measured: 39, 140
    ok = np.isfinite(t["flux"]) & (t["flux"] > 0)
    np.testing.assert_allclose(t["mag"][ok], t.meta["zeropoint"] - 2.5 * np.log10(t["flux"][ok]))
    assert np.all(t["fwhm"] > 2) and np.all(t["dof"] > 50)
    # the same measurement as the stamp fit where a star is alone in its group (the window
    # and noise differ a little: agreement within a fraction of the error)
    alone = (t["group_size"] == 1) & (np.asarray(t["flags"]) == 0) & (np.asarray(crowded["stamps"]["flags"]) == 0)
    d = (t["flux"] - crowded["stamps"]["flux"]) / t["flux_err"]
    assert alone.sum() > 30 and np.median(np.abs(d[alone])) < 0.3  # measured: 83 stars, 0.20


def test_grouped_fit_position(crowded):
    """With fit_position the positions move (a 1 px prior around the given ones)."""
    q, pos, psf, kw = crowded["q"], crowded["pos"], crowded["psf"], crowded["kw"]
    t = photometry(q.data, psf, pos["id", "x", "y"], sources=q.catalog, fit_position=True, **kw)
    clean = np.asarray(t["flags"]) == 0
    assert clean.sum() >= 140 and np.all(t["x_err"][clean] > 0)
    # measured: 152 unflagged, position pull std 1.02 / 1.03 (x / y), flux pull std 0.98
    for k in ("x", "y"):
        z = (t[k][clean] - pos[k][clean]) / t[f"{k}_err"][clean]
        assert 0.85 <= np.std(z) <= 1.2
    _, pull, bias = _clean_pulls(t, crowded["expected"])
    assert 0.9 <= np.std(pull) <= 1.15 and abs(bias) < 0.003
    assert t.meta["fit_position"] is True


def test_grouped_unmeasurable_positions(crowded):
    q, psf, kw = crowded["q"], crowded["psf"], crowded["kw"]
    pos = Table({"id": [1, 2, 3, 4], "x": [3.0, -40.0, np.nan, 200.0], "y": [200.0, 100.0, 50.0, 200.0]})
    t = photometry(q.data, psf, pos, sources="detect", **kw)
    flags = np.asarray(t["flags"])
    # fit disc leaving the image, off the image, not finite: NaN rows flagged OFF_IMAGE
    assert np.all(flags[:3] & int(Flag.OFF_IMAGE)) and np.all(np.isnan(t["flux"][:3])) and np.all(t["group_id"][:3] == -1)
    assert np.isfinite(t["flux"][3]) and not flags[3] & int(Flag.OFF_IMAGE)
    with pytest.raises(ValueError, match="'detect' or a table"):
        photometry(q.data, psf, pos, sources="all", **kw)
    with pytest.raises(ValueError, match="no variance= or neighbours="):
        photometry(q.data, psf, pos, sources="detect", neighbours=q.catalog, **kw)


def test_cli_sources(crowded, tmp_path, capsys):
    q, pos, psf = crowded["q"], crowded["pos"], crowded["psf"]
    img, psf_path, cat, out = tmp_path / "img.fits", tmp_path / "img.psf.fits", tmp_path / "pos.csv", tmp_path / "phot.ecsv"
    fits.PrimaryHDU(q.data, header=q.header).writeto(img)
    psf.write(psf_path)
    pos["id", "x", "y"].write(cat, format="ascii.csv")
    assert main(["photometry", str(img), "--psf", str(psf_path), "--positions", str(cat), "--sources", "detect",
                 "--out", str(out), "--mask", "none"]) == 0
    t = Table.read(out)
    np.testing.assert_allclose(t["flux"], crowded["detected"]["flux"], rtol=1e-5)
    np.testing.assert_array_equal(t["flags"], crowded["detected"]["flags"])
    np.testing.assert_array_equal(t["group_size"], crowded["detected"]["group_size"])
    # clear one-line errors
    capsys.readouterr()
    base = ["photometry", str(img), "--psf", str(psf_path), "--positions", str(cat)]
    assert main(base + ["--sources", "detect", "--neighbours", str(cat)]) == 2
    assert main(base + ["--link", "2"]) == 2
    err = capsys.readouterr().err
    assert "give one of them" in err and "need --sources" in err and "Traceback" not in err


def test_catalog_residual_image_default_name(crowded, tmp_path):
    """``ztfpsf catalog --residual-image`` without a name writes <stem>.residual.fits beside
    the catalogue: the name ``ztfpsf report`` looks for."""
    q, psf = crowded["q"], crowded["psf"]
    img, psf_path = tmp_path / "sim_sciimg.fits", tmp_path / "sim.psf.fits"
    fits.PrimaryHDU(q.data, header=q.header).writeto(img)
    psf.write(psf_path)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["catalog", str(img), "--psf", str(psf_path), "--out", str(out / "sim_sciimg.catalog.parquet"),
                 "--residual-image", "--mask", "none", "--single-pass"]) == 0
    res = fits.getdata(out / "sim_sciimg.residual.fits")
    assert res.shape == q.data.shape and res.dtype.kind == "f"
    # the stars are gone: the residual's rms is close to the sky's (the data's is far above)
    assert np.std(res) < 0.2 * np.std(q.data)
