"""The input chain (read, catalogue or detection, selection, stamps, noise model) feeding
``fit_stamps`` on real images with known answers (tests/data/images/PROVENANCE.md).

Every fit pads its stamps to one batch size (``_fit``) so that the whole module compiles
each model once; the padding stamps are fully masked and dropped from the results.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree

from ztfpsf import BAD, Flag, fit_stamps
from ztfpsf.detect import detect_stars, estimate_background
from ztfpsf.io.catalog import read_catalog
from ztfpsf.io.fits import read_exposure
from ztfpsf.selection import select_stars
from ztfpsf.stamps import cut_stamps, noise_model

DATA = Path(__file__).parent / "data" / "images"
BATCH = 256
# sep's image: a star has a SExtractor half-light radius (FLUX_RADIUS at 0.5) of 1.2-1.5 px
# (the locus of the bright unsaturated sources); galaxies have 2-8 px
STAR_R50 = 1.8
# its pixel scale is unknown (no WCS): isolation 8 px = 4 FWHM, stamps may come within 8 px
# of the edges (the image is only 256 px)
SEP_SELECTION = dict(isolation_px=8.0, edge=8, min_snr=10.0)
FAILED = Flag.NOT_CONVERGED | BAD


def _fit(stamps, noise, model="moffat"):
    """fit_stamps on the stamps padded with masked ones to BATCH (one compiled shape)."""
    n = len(stamps)
    assert 0 < n <= BATCH
    pad = BATCH - n
    data = np.concatenate([stamps.data, np.zeros((pad,) + stamps.data.shape[1:], stamps.data.dtype)])
    mask = np.concatenate([stamps.bad, np.ones((pad,) + stamps.data.shape[1:], bool)])
    origin = np.concatenate([stamps.origin, np.zeros((pad, 2))])
    xi = np.concatenate([stamps.x_init, np.full(pad, 8.0)])
    yi = np.concatenate([stamps.y_init, np.full(pad, 8.0)])
    kwargs = dict(noise)
    if "variance" in kwargs:
        kwargs["variance"] = np.concatenate([kwargs["variance"], np.ones((pad,) + stamps.data.shape[1:])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = fit_stamps(data, mask=mask, x_init=xi, y_init=yi, origin=origin, model=model, **kwargs)
    return table[:n]


def _converged_or_at_limit(table):
    """Fraction of the stars that converged or whose shape ran to its limit."""
    flags = np.asarray(table["flags"])
    return np.mean(((flags & Flag.NOT_CONVERGED) == 0) | ((flags & Flag.SHAPE_LIMIT) != 0))


def _prepare(name, *, catalog=None, **selection):
    exp = read_exposure(DATA / name)
    bkg = estimate_background(exp)
    stars = read_catalog(catalog, wcs=exp.wcs, image_shape=exp.shape) if catalog else detect_stars(exp, background=bkg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel, counts = select_stars(stars, exp, **selection)
    stamps = cut_stamps(exp, sel["x_init"], sel["y_init"], 17, background=bkg)
    noise, _ = noise_model(exp, stamps, bkg)
    return exp, stars, sel, counts, stamps, noise


# --------------------------------------------------------------------------------------
# sep's CCD image against its SExtractor catalogue
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sep_catalog():
    return read_catalog(DATA / "sep" / "image.cat")


@pytest.fixture(scope="module")
def sep_from_catalog():
    exp, cat, sel, counts, stamps, noise = _prepare("sep/image.fits", catalog=DATA / "sep" / "image.cat", **SEP_SELECTION)
    return exp, sel, counts, _fit(stamps, noise)


def test_sep_catalog_positions_agree_with_sextractor(sep_from_catalog):
    exp, sel, counts, fit = sep_from_catalog
    assert exp.wcs is None and exp.gain is None  # SExtractor's GAIN 0: the sky-variance noise model
    assert counts["catalog"] == 65 and counts["isolated"] < counts["edge"]
    star = (sel["FLAGS"] == 0) & (sel["FLUX_RADIUS_1"] < STAR_R50) & (fit["flags"] & FAILED == 0)
    assert star.sum() >= 10  # measured: 13 isolated FLAGS == 0 stars
    dx = fit["x"][star] - (sel["XWIN_IMAGE"][star] - 1.0)
    dy = fit["y"][star] - (sel["YWIN_IMAGE"][star] - 1.0)
    # measured: median |dx| 0.006 px, |dy| 0.004 px; the goal is 0.05 px
    assert np.median(np.abs(dx)) < 0.02 and np.median(np.abs(dy)) < 0.02
    assert abs(np.median(dx)) < 0.02 and abs(np.median(dy)) < 0.02  # no half-pixel or 1-based slip


def test_sep_catalog_fluxes_follow_flux_auto(sep_from_catalog):
    _, sel, _, fit = sep_from_catalog
    ok = (sel["FLAGS"] == 0) & (fit["flags"] & FAILED == 0) & (sel["FLUX_AUTO"] > 0)
    star = ok & (sel["FLUX_RADIUS_1"] < STAR_R50)
    ratio = fit["flux"][star] / sel["FLUX_AUTO"][star]
    # measured: median 1.00, range 0.83-1.25 (the fainter stars). The Kron aperture
    # (KRON_RADIUS x A_IMAGE = 3-8 px, 1.5-3.5 FWHM) misses only ~1 % of a Moffat with
    # alpha ~5 (the fitted value), so the two totals agree; FLUX_AUTO errors set the scatter
    assert 0.95 < np.median(ratio) < 1.10
    r_star = np.corrcoef(np.log10(fit["flux"][star]), np.log10(sel["FLUX_AUTO"][star]))[0, 1]
    r_all = np.corrcoef(np.log10(fit["flux"][ok]), np.log10(sel["FLUX_AUTO"][ok]))[0, 1]
    # measured: r = 0.995 for the stars (over 1.8 decades); 0.88 with the galaxies, which a
    # Moffat does not describe (some run to alpha ~ 1.1, whose wings extrapolate far beyond
    # their Kron flux: a huge flux_err says so)
    assert r_star >= 0.99 and r_all >= 0.85


def test_sep_detection_matches_sextractor(sep_catalog):
    exp, det, sel, counts, stamps, noise = _prepare("sep/image.fits", **SEP_SELECTION)
    assert det.meta["r50_star"] == pytest.approx(1.2, abs=0.15)  # SExtractor: 1.21-1.24 for the bright stars
    fit = _fit(stamps, noise)
    tree = cKDTree(np.c_[sep_catalog["x"], sep_catalog["y"]])
    dist, j = tree.query(np.c_[fit["x_init"], fit["y_init"]])
    match = (dist < 1.5) & (sep_catalog["FLAGS"][j] == 0) & (fit["flags"] & FAILED == 0)
    assert match.sum() >= 5  # measured: 7 (stars only: detection's size cut leaves galaxies out)
    assert np.all(sep_catalog["FLUX_RADIUS_1"][j[match]] < STAR_R50)
    dx = fit["x"][match] - (sep_catalog["XWIN_IMAGE"][j[match]] - 1.0)
    dy = fit["y"][match] - (sep_catalog["YWIN_IMAGE"][j[match]] - 1.0)
    assert np.median(np.abs(dx)) < 0.02 and np.median(np.abs(dy)) < 0.02  # measured 0.006, 0.008
    ratio = fit["flux"][match] / sep_catalog["FLUX_AUTO"][j[match]]
    assert 0.95 < np.median(ratio) < 1.10  # measured 1.02


# --------------------------------------------------------------------------------------
# photographic plates with a DSS WCS: detection, selection and fit end to end
# --------------------------------------------------------------------------------------
PLATES = {
    # file: (pixel scale from PLTSCALE x XPIXELSZ [arcsec/px], fwhm bounds [arcsec], min selected)
    "photutils_datasets/M6707HH.fits": (67.2 * 25.28445e-3, (2.0, 5.0), 100),
    "astropy_data/HorseHead.fits": (67.2 * 15.0295e-3, (2.0, 5.0), 20),
}


@pytest.fixture(scope="module", params=sorted(PLATES))
def plate(request):
    exp, det, sel, counts, stamps, noise = _prepare(request.param)
    fits_ = {model: _fit(stamps, noise, model) for model in ("moffat", "gaussian")}
    return request.param, exp, counts, fits_


def test_plate_wcs_and_selection(plate):
    name, exp, counts, _ = plate
    scale, _, min_selected = PLATES[name]
    assert "DSS plate solution" in exp.wcs_note
    assert exp.pixel_scale == pytest.approx(scale, rel=0.01)
    assert counts["clean"] >= min_selected  # measured: M67 183, HorseHead 29
    assert list(counts.values()) == sorted(counts.values(), reverse=True)


def test_plate_fits_converge_with_sensible_fwhm(plate):
    name, exp, counts, fits_ = plate
    lo, hi = PLATES[name][1]
    gauss, moffat = fits_["gaussian"], fits_["moffat"]
    # Gaussian: measured 100 % flags == 0 on both plates
    assert np.mean(gauss["flags"] == 0) >= 0.9
    # Moffat: plate PSFs have Gaussian-like wings: alpha often runs off towards infinity
    # (SHAPE_LIMIT, values kept), where chi2 keeps falling and no minimum is reached
    # (NOT_CONVERGED: the Gaussian-limit stars; measured 93 % (M67) and 70 % (HorseHead)
    # converged, all with values; all but one of the others at the shape limit)
    assert np.mean(moffat["flags"] & BAD == 0) >= 0.99
    assert _converged_or_at_limit(moffat) >= 0.9
    for table in (gauss, moffat):
        good = table["flags"] & FAILED == 0
        fwhm_arcsec = np.median(table["fwhm"][good]) * exp.pixel_scale
        # measured: M67 3.1" (Moffat) / 3.6" (Gaussian); HorseHead 3.4" / 3.6"
        assert lo < fwhm_arcsec < hi


# --------------------------------------------------------------------------------------
# Spitzer: Galactic CAR WCS, MJy/sr, NaN pixels
# --------------------------------------------------------------------------------------
SPITZER = "photutils_datasets/spitzer_example_image.fits"


def test_spitzer_read_detect_select_fit():
    exp, det, sel, counts, stamps, noise = _prepare(SPITZER)
    raw = fits.getdata(DATA / SPITZER)
    np.testing.assert_array_equal(exp.mask, np.isnan(raw))
    assert exp.mask.sum() == 3
    # a Galactic WCS is celestial (astropy converts ICRS coordinates to it)
    assert exp.wcs is not None and "GLON" in exp.wcs_note
    assert exp.pixel_scale == pytest.approx(1.2, rel=1e-6)  # PIXSCAL1
    assert exp.gain is None and any("MJy/sr" in n for n in exp.notes)  # GAIN is e-/DN
    assert np.isfinite(det["ra"]).all()
    assert counts["clean"] >= 3 and "variance" in noise  # measured: 7 stars
    fit = _fit(stamps, noise)
    flags = np.asarray(fit["flags"])
    good = (flags & BAD) == 0
    assert good.mean() >= 0.8
    # a star whose alpha runs off to infinity (a Gaussian-like core, undersampled) has no
    # minimum to converge to: it is NOT_CONVERGED, and at the SHAPE_LIMIT
    running = (flags & Flag.NOT_CONVERGED) != 0
    assert np.all(flags[running] & Flag.SHAPE_LIMIT) and running.sum() <= 1
    # IRAC channel 1: FWHM 1.66" (undersampled at 1.2"/px); measured Moffat 1.57"
    assert 1.2 < np.median(fit["fwhm"][good]) * exp.pixel_scale < 2.5


def test_spitzer_with_a_nan_border(tmp_path):
    with fits.open(DATA / SPITZER) as hdul:
        data = hdul[0].data.astype(np.float32)
        header = hdul[0].header.copy()
    data[:, :60] = np.nan
    data[-40:, :] = np.nan
    path = tmp_path / "spitzer_nan_border.fits"
    fits.PrimaryHDU(data, header).writeto(path)
    exp = read_exposure(path)
    np.testing.assert_array_equal(exp.mask, np.isnan(data))
    bkg = estimate_background(exp)
    assert np.isfinite(bkg.level).all() and np.isfinite(bkg.rms).all()
    det = detect_stars(exp, background=bkg)
    assert len(det) > 100 and np.all(det["x"] > 59) and np.all(det["y"] < data.shape[0] - 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel, counts = select_stars(det, exp)
    stamps = cut_stamps(exp, sel["x_init"], sel["y_init"], 17, background=bkg)
    assert not (stamps.mask[:, 5:12, 5:12]).any()  # clean cores: no NaN near any selected star
    noise, _ = noise_model(exp, stamps, bkg)
    fit = _fit(stamps, noise)
    assert len(fit) == counts["clean"] > 0
    # the same stars as on the intact image, measured the same: the NaN border changes nothing
    _, _, _, _, whole_stamps, whole_noise = _prepare(SPITZER)
    whole = _fit(whole_stamps, whole_noise)
    d, j = cKDTree(np.column_stack([whole["x"], whole["y"]])).query(np.column_stack([fit["x"], fit["y"]]))
    assert np.all(d < 0.01)  # measured: < 3e-5 px
    np.testing.assert_allclose(fit["flux"], whole["flux"][j], rtol=0.005)  # measured: 0.09 %
    np.testing.assert_allclose(fit["fwhm"], whole["fwhm"][j], rtol=0.005)
    np.testing.assert_array_equal(fit["flags"], whole["flags"][j])


# --------------------------------------------------------------------------------------
# the same through `ztfpsf fit` (pipeline outputs and summary)
# --------------------------------------------------------------------------------------
def _cli(tmp_path, image, *args):
    from ztfpsf.cli import main
    from ztfpsf.io.results import read_json, read_parquet
    from ztfpsf.pipeline import output_paths

    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["-q", "fit", str(DATA / image), "--out", str(out), *args])
    paths = output_paths(DATA / image, out)
    return code, read_parquet(paths["stars"]), read_json(paths["summary"])


@pytest.mark.parametrize("source", ["catalog", "detection"])
def test_cli_on_sep_image_agrees_with_sextractor(tmp_path, sep_catalog, source):
    args = ["--isolation-px", "8", "--edge", "8", "--min-snr", "10"]
    if source == "catalog":
        args += ["--catalog", str(DATA / "sep" / "image.cat")]  # x/y columns, 1-based
    code, table, summary = _cli(tmp_path, "sep/image.fits", *args)
    assert code == 0 and summary["status"] == "ok"
    good = table[(table["flags"] & FAILED) == 0]
    tree = cKDTree(np.column_stack([sep_catalog["x"], sep_catalog["y"]]))
    d, j = tree.query(np.column_stack([good["x"], good["y"]]))
    star = (d < 1.0) & (sep_catalog["FLAGS"][j] == 0) & (sep_catalog["FLUX_RADIUS_1"][j] < STAR_R50)
    assert star.sum() >= 6  # measured: 13 (catalogue), 7 (detection)
    dx = good["x"][star] - (sep_catalog["XWIN_IMAGE"][j[star]] - 1.0)
    dy = good["y"][star] - (sep_catalog["YWIN_IMAGE"][j[star]] - 1.0)
    assert np.median(np.abs(dx)) < 0.05 and np.median(np.abs(dy)) < 0.05
    ratio = good["flux"][star] / sep_catalog["FLUX_AUTO"][j[star]]
    assert 0.9 < np.median(ratio) < 1.1
    assert np.corrcoef(np.log(good["flux"][star]), np.log(sep_catalog["FLUX_AUTO"][j[star]]))[0, 1] > 0.98


@pytest.mark.parametrize("image", sorted(PLATES))
def test_cli_on_plates_reports_fwhm_in_arcsec(tmp_path, image):
    code, table, summary = _cli(tmp_path, image)
    assert code == 0
    lo, hi = PLATES[image][1]
    assert lo < summary["fwhm_median_arcsec"] < hi
    assert summary["n_fitted"] > 0 and summary["n_failed"] == 0
    assert summary["n_converged"] == np.sum((np.asarray(table["flags"]) & FAILED) == 0)
    assert _converged_or_at_limit(table) >= 0.9


def test_cli_on_spitzer_runs_without_traceback(tmp_path, capsys):
    code, table, summary = _cli(tmp_path, SPITZER)
    assert code == 0 and summary["status"] == "ok" and len(table) == summary["counts"]["clean"] >= 3
    assert "Traceback" not in capsys.readouterr().err
    # MJy/sr pixels: the e-/DN GAIN is not applied; the noise is the measured sky variance
    assert table.meta["gain"] is None and summary["noise"]["model"] == "sky variance"
    assert summary["exposure"]["masked_pixels"] == 3  # the image's NaN pixels
    good = (np.asarray(table["flags"]) & FAILED) == 0
    assert good.mean() >= 0.6 and summary["n_converged"] >= 0.6 * summary["n_fitted"]
    # IRAC channel 1: FWHM 1.66" (undersampled at 1.2"/px); measured 1.77" (median of 3)
    assert table.meta["pixel_scale"] == pytest.approx(1.2, rel=1e-6)
    assert 1.2 < summary["fwhm_median_arcsec"] < 2.5
    assert summary["fwhm_median_arcsec"] == pytest.approx(np.median(table["fwhm"][np.asarray(table["flags"]) == 0]) * 1.2, rel=1e-6)
    # the Galactic CAR WCS: ra, dec of each star are the ICRS position of its detected pixel
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS

    sky = WCS(fits.getheader(DATA / SPITZER)).pixel_to_world(table["x_init"], table["y_init"]).icrs
    sep = sky.separation(SkyCoord(table["ra"], table["dec"], unit="deg")).arcsec
    assert np.all(sep < 0.01)
