"""The simulated ZTF-like quadrant: determinism, headers, WCS, files, noise, rendering and
the PSF in the pixels against the truth it claims (``ztfpsf simulate``)."""

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from ztfpsf import fit_stamps
from ztfpsf.cli import main
from ztfpsf.io.ztf import DEFAULT_BAD_BITS, MASK_BITS, bad_bits_value, parse_filename
from ztfpsf.models import EllipticalMoffat
from ztfpsf.simulate import (
    VaryingPSF,
    make_quadrant,
    nominal_center,
    quadrant_filename,
    render_stars,
    simulate_quadrant,
)

SIZE = (500, 520)  # (ny, nx): not square, so that a swapped axis shows
SAT = 30000.0  # low enough that the brightest few stars of 300 saturate
OPTS = dict(seed=1, size=SIZE, nstars=300, saturation=SAT)
BAD = bad_bits_value(DEFAULT_BAD_BITS)


@pytest.fixture(scope="module")
def quad():
    return make_quadrant(**OPTS)


@pytest.fixture(scope="module")
def files(quad, tmp_path_factory):
    return quad.write(tmp_path_factory.mktemp("quad"))


@pytest.fixture(scope="module")
def sparse():
    """Few bright stars (13.5-17.5 mag): many of them isolated, for photometry and PSF checks."""
    return make_quadrant(seed=5, size=SIZE, nstars=60, mag_range=(13.5, 17.5))


@pytest.fixture(scope="module")
def isolated(sparse):
    """Clean stars of ``sparse`` with no other star within 30 px, 25 px from the edges."""
    t = sparse.truth
    xy = np.c_[t["x"], t["y"]]
    d, _ = cKDTree(xy).query(xy, k=2)
    ny, nx = SIZE
    ok = (d[:, 1] > 30) & t["clean"] & (t["x"] > 25) & (t["x"] < nx - 26) & (t["y"] > 25) & (t["y"] < ny - 26)
    sel = t[ok]
    assert len(sel) >= 10, "the fixture needs bright isolated stars"
    return sel


def sky_sigma(bg, gain=6.2, rn=8.0):
    return np.sqrt(bg / gain + (rn / gain) ** 2)


# -- determinism and files -------------------------------------------------------------
def test_same_seed_same_bytes_other_seed_differs(files, tmp_path):
    again = simulate_quadrant(tmp_path / "a", **OPTS)
    for kind, path in files.items():
        assert path.read_bytes() == again[kind].read_bytes(), kind
    other = make_quadrant(**{**OPTS, "seed": 2})
    q = make_quadrant(**OPTS)
    assert not np.allclose(other.truth["x"], q.truth["x"])
    assert np.nanmax(np.abs(other.data - q.data)) > 10


def test_file_names_parse_as_ztf(files):
    sci = parse_filename(files["sciimg"].name)
    assert files["sciimg"].name == "ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits"
    assert sci == {"filefracday": "20200924431759", "date": "2020-09-24T10:21:43", "field": 655, "filter": "zr", "ccd": 13, "qid": 3, "rcid": 50, "suffix": "sciimg"}
    assert parse_filename(files["mskimg"].name)["suffix"] == "mskimg"
    assert files["catalog"].name == "ztf_20200924431759_000655_zr_c13_o_q3_catalog.csv"
    assert files["truth"].name == "ztf_20200924431759_000655_zr_c13_o_q3_truth.ecsv"
    name = quadrant_filename("2021-03-05T23:59:59.9", 1234, "zg", 2, 4)
    assert name == "ztf_20210305999998_001234_zg_c02_o_q4_sciimg.fits"
    p = parse_filename(name)
    assert (p["field"], p["filter"], p["ccd"], p["qid"], p["rcid"]) == (1234, "zg", 2, 4, 7)


def test_headers(files, quad):
    h = fits.getheader(files["sciimg"])
    assert (h["BITPIX"], h["NAXIS1"], h["NAXIS2"]) == (-32, SIZE[1], SIZE[0])
    assert (h["GAIN"], h["READNOI"], h["SATURATE"], h["MAGZP"], h["EXPTIME"]) == (6.2, 8.0, SAT, 26.2, 30.0)
    assert (h["FILTER"], h["FILTERID"], h["CCDID"], h["QID"], h["RCID"], h["FIELDID"]) == ("ZTF_r", 2, 13, 3, 50, 655)
    assert (h["BUNIT"], h["ORIGIN"]) == ("DN", "ztfpsf simulate")
    assert h["OBSMJD"] == pytest.approx(Time("2020-09-24T10:21:43.98").mjd, abs=1e-9)
    assert h["DATE-OBS"].startswith("2020-09-24T10:21:43.98")
    assert h["SEEING"] == pytest.approx(np.median(quad.psf.fwhm(*np.meshgrid(np.linspace(0, 519, 33), np.linspace(0, 499, 33)))) * 1.012, abs=1e-3)
    assert VaryingPSF.from_header(h) == quad.psf
    m = fits.getheader(files["mskimg"])
    assert (m["BITPIX"], m["NAXIS1"], m["NAXIS2"], m["CCDID"], m["QID"]) == (16, SIZE[1], SIZE[0], 13, 3)


def test_wcs_scale_orientation_and_catalogue_round_trip(files, quad):
    wcs = WCS(fits.getheader(files["sciimg"]))
    assert wcs.wcs.ctype[0] == "RA---TAN" and wcs.wcs.ctype[1] == "DEC--TAN"
    assert np.allclose(proj_plane_pixel_scales(wcs) * 3600, 1.012, rtol=1e-12)
    (ra0, dec0), (ra1, dec1), (ra2, dec2) = wcs.all_pix2world([[259.5, 249.5], [269.5, 249.5], [259.5, 259.5]], 0)
    assert (ra0, dec0) == pytest.approx(nominal_center(13, 3), abs=1e-9)  # the centre
    assert ra1 < ra0 and abs(dec1 - dec0) < 1e-6  # east left: +x is west
    assert dec2 - dec0 == pytest.approx(10 * 1.012 / 3600, rel=1e-6)  # north up
    cat = Table.read(files["catalog"], format="ascii.csv")
    truth = Table.read(files["truth"], format="ascii.ecsv")
    assert cat.colnames == ["id", "ra", "dec", "mag"]
    assert len(cat) == len(truth) == 300 and np.all(cat["id"] == truth["id"])
    x, y = wcs.all_world2pix(cat["ra"], cat["dec"], 0)
    assert np.abs(x - truth["x"]).max() < 1e-6 and np.abs(y - truth["y"]).max() < 1e-6
    assert np.all(cat["mag"] == truth["mag"])


def test_truth_table(files, quad):
    t = Table.read(files["truth"], format="ascii.ecsv")
    for name in ("id", "ra", "dec", "mag", "x", "y", "flux", "fwhm", "alpha", "e1", "e2", "background", "saturated", "clean"):
        assert name in t.colnames
    assert np.allclose(t["flux"], 10 ** (-0.4 * (t["mag"] - 26.2)), rtol=1e-12)
    psf = VaryingPSF.from_dict(t.meta["psf"])
    assert psf == quad.psf
    assert np.allclose(t["fwhm"], psf.fwhm(t["x"], t["y"]), rtol=1e-12)
    assert np.allclose(t["e2"], psf.e2(t["x"], t["y"]), rtol=1e-12)
    assert t["x"].min() >= -0.5 and t["x"].max() < SIZE[1] - 0.5 and t["y"].max() < SIZE[0] - 0.5
    assert 12 <= t["mag"].min() and t["mag"].max() <= 21
    # background = the sky plane: 150 ADU at the centre, +10 ADU across x, +5 across y
    expect = 150 + 10 * (t["x"] / (SIZE[1] - 1) - 0.5) + 5 * (t["y"] / (SIZE[0] - 1) - 0.5)
    assert np.allclose(t["background"], expect, rtol=1e-6)


def test_astrometric_noise_only_in_catalogue():
    q = make_quadrant(**{**OPTS, "astrometric_noise": 0.05})
    d = (q.catalog["dec"] - q.truth["dec"]) * 3600
    r = (q.catalog["ra"] - q.truth["ra"]) * 3600 * np.cos(np.radians(q.truth["dec"]))
    assert np.std(d) == pytest.approx(0.05, rel=0.15) and np.std(r) == pytest.approx(0.05, rel=0.15)


# -- pixels: sky, noise, saturation, mask -----------------------------------------------
def test_sky_and_noise_level(quad):
    ny, nx = SIZE
    yy, xx = np.mgrid[0:ny, 0:nx]
    bg = 150 + 10 * (xx / (nx - 1) - 0.5) + 5 * (yy / (ny - 1) - 0.5)
    empty = quad.mask == 0  # no source bits, no defects
    resid = (quad.data - bg)[empty]
    assert empty.sum() > 0.5 * nx * ny
    # the wings of stars below the source threshold still add light there
    t = quad.truth
    stars, _, _ = render_stars(SIZE, np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["flux"]), quad.psf)
    leak = stars[empty].mean()
    assert 0.05 < leak < 0.5
    assert np.mean(resid) == pytest.approx(leak, abs=4 * sky_sigma(150.0) / np.sqrt(empty.sum()))
    assert np.std(resid) == pytest.approx(sky_sigma(150.0), rel=0.02)


def test_saturation_clipped_and_flagged(quad):
    t = quad.truth
    assert t["saturated"].sum() >= 1
    assert np.nanmax(quad.data) == SAT
    at_sat = quad.data == SAT
    sat_bit = (quad.mask >> MASK_BITS["saturated"]) & 1 == 1
    assert np.array_equal(at_sat, sat_bit)
    for row in t[t["saturated"]]:
        ix, iy = round(row["x"]), round(row["y"])
        if 1 <= ix < SIZE[1] - 1 and 1 <= iy < SIZE[0] - 1:
            assert at_sat[iy - 1 : iy + 2, ix - 1 : ix + 2].any()
    # a star whose own peak is well below saturation has no saturated pixel of its own
    assert np.all(t["peak"][~t["saturated"]] + t["background"][~t["saturated"]] < SAT)
    assert not np.any(t["clean"] & t["saturated"])


def test_mask_bits(quad, files):
    m = fits.getdata(files["mskimg"])
    assert m.dtype.kind == "i" and np.array_equal(m, quad.mask)
    data = fits.getdata(files["sciimg"])
    bit = lambda name: (m >> MASK_BITS[name]) & 1 == 1  # noqa: E731
    assert np.array_equal(np.isnan(data), bit("nan")) and np.array_equal(bit("dead"), bit("nan"))
    dead_cols = np.flatnonzero(bit("dead").any(axis=0))
    assert 1 <= len(dead_cols) <= 3 and bit("dead")[-1, dead_cols].all()  # columns up to the top
    track = bit("tracks") & ~bit("nan") & (m & (1 << MASK_BITS["sexsources"]) == 0)
    assert track.sum() > 500 and np.percentile(data[track], 90) > 150 + 8 * sky_sigma(150)  # a bright streak
    assert 10 <= bit("noisy").sum() <= 40  # 1e-4 of 260000 pixels
    # source bits sit on stars and do not count as bad
    t = quad.truth
    bright = t[(t["mag"] < 17) & (t["x"] > 1) & (t["y"] > 1) & (t["x"] < SIZE[1] - 2) & (t["y"] < SIZE[0] - 2)]
    assert all(bit("sexsources")[round(r["y"]), round(r["x"])] for r in bright)
    assert bit("psfsources").sum() < bit("sexsources").sum()
    assert BAD & (1 << MASK_BITS["sexsources"]) == 0
    # clean stars have a clean 17x17 box
    for r in t[t["clean"]]:
        ix, iy = round(r["x"]), round(r["y"])
        assert not np.any(m[iy - 8 : iy + 9, ix - 8 : ix + 9] & BAD)


def test_no_mask_no_defects(tmp_path):
    paths = simulate_quadrant(tmp_path, seed=2, size=(120, 100), nstars=30, mask=False, ccd=1, qid=1)
    assert paths["mskimg"] is None and not list(tmp_path.glob("*mskimg*"))
    data = fits.getdata(paths["sciimg"])
    assert np.isfinite(data).all()
    assert parse_filename(paths["sciimg"].name)["rcid"] == 0


# -- the stars in the pixels ------------------------------------------------------------
def test_render_matches_model_including_image_edges():
    psf = VaryingPSF.constant(2.3, 2.8, 0.05, -0.03, size=(40, 50))
    x, y, flux = np.array([20.3, 0.4, 48.9]), np.array([15.7, 38.2, 1.1]), np.array([1e4, 5e3, 2e3])
    image, peak, size = render_stars((40, 50), x, y, flux, psf)
    assert np.all(size >= 25)
    ref = np.asarray(EllipticalMoffat(integration="gl8").image(flux, x, y, psf.shape(x, y), 0.0, 40, 50))
    assert np.abs(image - ref.sum(axis=0)).max() < 0.005  # the wing limit: stamps end where the wings are below 0.005 ADU
    assert np.abs(image - ref.sum(axis=0)).max() > 0  # (not the same code)
    assert np.allclose(peak, ref.max(axis=(1, 2)), rtol=1e-5)


def test_aperture_flux_matches_truth(sparse, isolated):
    """Total light in a 20 px aperture (minus the known sky) = truth flux times the
    Moffat's enclosed fraction, within the noise."""
    ny, nx = SIZE
    yy, xx = np.mgrid[0:ny, 0:nx]
    pulls = []
    for r in isolated:
        ap = np.hypot(xx - r["x"], yy - r["y"]) < 20
        if np.any(sparse.mask[ap] & BAD):
            continue
        bg = 150 + 10 * (xx[ap] / (nx - 1) - 0.5) + 5 * (yy[ap] / (ny - 1) - 0.5)
        measured = np.sum(sparse.data[ap] - bg)
        gamma2 = r["fwhm"] ** 2 / (4 * (2 ** (1 / r["alpha"]) - 1))
        expected = r["flux"] * (1 - (1 + 400 / gamma2) ** (1 - r["alpha"]))
        sigma = math.sqrt(np.sum(sky_sigma(bg) ** 2) + r["flux"] / 6.2)
        pulls.append((measured - expected) / sigma)
    assert len(pulls) >= 8
    assert np.all(np.abs(pulls) < 4), pulls
    assert abs(np.mean(pulls)) < 4 / np.sqrt(len(pulls))


def test_psf_in_pixels_matches_truth(sparse, isolated):
    """Fitting the image's stars recovers VaryingPSF at their positions and the truth
    positions and fluxes, within the fit's errors."""
    ny, nx = SIZE
    t = sparse.truth
    stars, _, _ = render_stars(SIZE, np.asarray(t["x"]), np.asarray(t["y"]), np.asarray(t["flux"]), sparse.psf)
    yy, xx = np.mgrid[0:ny, 0:nx]
    variance = (stars + 150 + 10 * (xx / (nx - 1) - 0.5) + 5 * (yy / (ny - 1) - 0.5)) / 6.2 + (8.0 / 6.2) ** 2
    ix, iy = np.rint(isolated["x"]).astype(int), np.rint(isolated["y"]).astype(int)
    cut = lambda a: np.stack([a[j - 8 : j + 9, i - 8 : i + 9] for i, j in zip(ix, iy)]).astype(float)  # noqa: E731
    # the same call as tests/test_fit.py, so that the compiled fit is shared
    res = fit_stamps(cut(sparse.data), cut(variance), model="elliptical_moffat", dtype="float64")
    res["x"] += ix - 8
    res["y"] += iy - 8
    assert np.all(res["flags"] == 0)
    for name in ("x", "y", "flux", "fwhm", "alpha", "e1", "e2"):
        pull = (res[name] - isolated[name]) / res[name + "_err"]
        assert np.all(np.abs(pull) < 4.5), (name, pull)
        assert abs(np.mean(pull)) < 4 / np.sqrt(len(pull)), (name, pull)  # no bias
    bright = isolated["mag"] < 16
    assert bright.sum() >= 3 and np.all(np.abs(res["fwhm"][bright] / isolated["fwhm"][bright] - 1) < 0.01)


# -- VaryingPSF -------------------------------------------------------------------------
def test_varying_psf_default_constant_and_storage():
    p = VaryingPSF.default()
    x, y = np.meshgrid(np.linspace(0, 3071, 65), np.linspace(0, 3079, 65))
    f, a, e1, e2 = p.shape(x, y)
    assert 1.9 <= f.min() and f.max() <= 2.4 + 1e-12 and f.max() - f.min() > 0.3
    assert 2.5 - 1e-12 <= a.min() and a.max() <= 3.5 + 1e-12
    assert np.hypot(e1, e2).max() < 0.08
    assert p.fwhm(3.0, 4.0).shape == () and p.alpha(x, y).shape == x.shape
    assert VaryingPSF.from_header(p.to_header()) == p
    assert VaryingPSF.from_dict(p.to_dict()) == p
    c = VaryingPSF.constant(2.5, 3.2, size=(100, 80))
    assert c.is_constant and not p.is_constant
    assert np.all(c.fwhm(x, y) == 2.5) and np.all(c.e1(x, y) == 0)
    assert VaryingPSF.from_header(c.to_header()) == c
    stamp = p.stamp([10.0, 3000.0], [20.0, 3000.0], size=41)
    assert stamp.shape == (2, 41, 41) and np.allclose(stamp.sum(axis=(1, 2)), 1.0, atol=2e-3)
    with pytest.raises(ValueError, match="unphysical"):
        VaryingPSF([[2.0, 3.0]], 3.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ccd"):
        make_quadrant(size=(50, 50), nstars=5, ccd=17)
    with pytest.raises(ValueError, match="filter"):
        make_quadrant(size=(50, 50), nstars=5, filter="r")
    with pytest.raises(ValueError, match="size"):
        make_quadrant(size=(10, 50), nstars=5)


# -- the command ------------------------------------------------------------------------
def test_cli_writes_files(tmp_path):
    out = tmp_path / "sim"
    rc = main(["simulate", str(out), "--seed", "3", "--size", "120", "150", "--nstars", "40", "--constant-psf", "--fwhm", "2.5",
               "--field", "801", "--ccd", "5", "--qid", "2", "--filter", "zi", "--no-mask", "--noise", "gaussian"])
    assert rc == 0
    (sci,) = out.glob("*_sciimg.fits")
    p = parse_filename(sci.name)
    assert (p["field"], p["filter"], p["ccd"], p["qid"]) == (801, "zi", 5, 2)
    h = fits.getheader(sci)
    assert (h["NAXIS2"], h["NAXIS1"], h["FILTERID"], h["SEEING"]) == (120, 150, 3, pytest.approx(2.5 * 1.012))
    truth = Table.read(sci.with_name(sci.name.replace("_sciimg.fits", "_truth.ecsv")))
    assert len(truth) == 40 and np.all(truth["fwhm"] == 2.5) and not list(out.glob("*mskimg*"))


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["simulate", str(tmp_path), "--ccd", "17", "--size", "50", "50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ztfpsf simulate: error:") and "ccd" in err and "\n" not in err


# -- one full ZTF-size quadrant: star counts after the study's cuts ------------------------
@pytest.mark.slow
def test_full_quadrant_counts_match_the_study():
    q = make_quadrant(seed=0, noise="gaussian")
    t = q.truth
    assert q.data.shape == (3080, 3072) and q.data.dtype == np.float32 and len(t) == 15000
    ny, nx = q.data.shape
    xy = np.c_[t["x"], t["y"]]
    d, _ = cKDTree(xy).query(xy, k=2)
    iso = (d[:, 1] > 20 / 1.012) & (t["x"] >= 15) & (t["x"] <= nx - 16) & (t["y"] >= 15) & (t["y"] <= ny - 16)
    sel = iso & (t["mag"] >= 14) & (t["mag"] <= 18)
    # the ZTF study: 15174 Gaia stars -> 2075 isolated away from edges -> 473 in 14-18 mag
    assert 1800 < iso.sum() < 2400, iso.sum()
    assert 380 < sel.sum() < 570, sel.sum()
    # luminosity function: counts per magnitude rise as 10**(0.2 m)
    counts, edges = np.histogram(t["mag"], bins=9, range=(12, 21))
    slope = np.polyfit(edges[:-1] + 0.5, np.log10(counts), 1, w=np.sqrt(counts))[0]
    assert slope == pytest.approx(0.2, abs=0.02)
    assert 5 <= t["saturated"].sum() <= 60  # the brightest stars, ~12-12.5 mag, saturate at 50000 ADU
