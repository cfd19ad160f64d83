"""Forced PSF photometry on a simulated image with a known, spatially varying PSF."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from ztfpsf.cli import main
from ztfpsf.flags import Flag
from ztfpsf.models import get_model
from ztfpsf.photometry import photometry
from ztfpsf.psf import PSFModel
from ztfpsf.simulate import mag_to_flux

NY, NX = 1230, 1200
GAIN, RN, SKY, ZP = 6.2, 8.0, 150.0, 26.2
HALF = 12  # stars rendered out to 12 px (the fit's 17x17 stamps see all of their pixels)
# the truth: a Moffat whose log fwhm and log(alpha - 1) vary linearly over the image
TRUE_PSF = PSFModel("moffat", [[np.log(2.2), 0.06, -0.04], [np.log(2.0), 0.1, 0.05]], (-0.5, NX - 0.5, -0.5, NY - 0.5), degree=1,
                    image_shape=(NY, NX))
BAD_POSITIONS = np.array([[3.0, 600.0], [-40.0, 100.0], [np.nan, 50.0], [1195.5, 600.0], [600.0, 1229.0]])


def render(psf, x, y, flux, seed=0):
    """Noisy image: stars with 8x8 Gauss-Legendre pixel integration, sky, Poisson and read noise."""
    rng = np.random.default_rng(seed)
    g = get_model("moffat", "gl8")
    s = psf.shape(x, y)
    size = 2 * HALF + 1
    x0, y0 = np.floor(x + 0.5).astype(int) - HALF, np.floor(y + 0.5).astype(int) - HALF
    stamps = np.asarray(g.image(jnp.asarray(flux), jnp.asarray(x - x0), jnp.asarray(y - y0),
                                (jnp.asarray(s["fwhm"]), jnp.asarray(s["alpha"])), 0.0, size, size))
    img = np.full((NY, NX), SKY)
    yy, xx = np.mgrid[0:size, 0:size]
    np.add.at(img, (y0[:, None, None] + yy, x0[:, None, None] + xx), stamps)
    noisy = (rng.poisson(img * GAIN) + rng.normal(0, RN, img.shape)) / GAIN
    return noisy.astype(np.float32)


def cramer_rao(x, y, flux, psf):
    """sigma of (flux, x, y, background) from the Fisher matrix of the true model and noise
    (derivatives of the 4x4 Gauss-Legendre integrated profile: as exact, cheaper to compile)."""
    g = get_model("moffat", "gl4")
    s = psf.shape(x, y)
    x0, y0 = np.floor(x + 0.5) - 8, np.floor(y + 0.5) - 8

    def one(f, dx, dy, fwhm, alpha):
        mu = lambda p: g.image(p[0], p[1], p[2], (fwhm, alpha), p[3], 17, 17).ravel()
        p = jnp.array([f, dx, dy, SKY])
        J = jax.jacfwd(mu)(p)
        F = J.T @ (J / (mu(p) / GAIN + (RN / GAIN) ** 2)[:, None])
        return jnp.sqrt(jnp.diag(jnp.linalg.inv(F)))

    out = jax.jit(jax.vmap(one))(*(jnp.asarray(a) for a in (flux, x - x0, y - y0, s["fwhm"], s["alpha"])))
    return np.asarray(out)


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(7)
    gx, gy = np.meshgrid(np.arange(20.0, NX - 20, 30), np.arange(20.0, NY - 20, 30))
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    mag = rng.uniform(14.0, 20.0, x.size)
    flux = mag_to_flux(mag, ZP)
    image = render(TRUE_PSF, x, y, flux)
    # positions: the stars, 40 empty-sky points between them, and positions that cannot be measured
    sky = np.stack([gx.ravel()[:40] + 15.0, gy.ravel()[:40] + 15.0], axis=1)
    pos = Table({"id": np.arange(x.size + 40 + len(BAD_POSITIONS)),
                 "x": np.concatenate([x, sky[:, 0], BAD_POSITIONS[:, 0]]),
                 "y": np.concatenate([y, sky[:, 1], BAD_POSITIONS[:, 1]])})
    return dict(x=x, y=y, flux=flux, image=image, positions=pos, n=x.size)


@pytest.fixture(scope="module")
def forced(scene):
    return photometry(scene["image"], TRUE_PSF, scene["positions"], gain=GAIN, read_noise=RN, zeropoint=ZP)


@pytest.fixture(scope="module")
def free_position(scene):
    return photometry(scene["image"], TRUE_PSF, scene["positions"], gain=GAIN, read_noise=RN, zeropoint=ZP, fit_position=True)


def test_forced_flux_bias_and_pulls(scene, forced):
    n = scene["n"]
    t = forced[:n]
    assert np.all(t["flags"] == 0)
    ratio = t["flux"] / scene["flux"]
    assert abs(np.median(ratio) - 1) < 0.003  # acceptance: median bias < 0.3 %
    assert abs(np.median(ratio) - 1) < 0.001  # what it achieves
    pull = (t["flux"] - scene["flux"]) / t["flux_err"]
    assert 0.9 < np.std(pull) < 1.1
    assert abs(np.median(pull)) < 0.1
    np.testing.assert_array_equal(t["x"], scene["x"])  # held fixed
    assert np.all(t["x_err"] == 0)
    np.testing.assert_allclose(t["fwhm"], TRUE_PSF.fwhm(scene["x"], scene["y"]))
    assert forced.meta["fit_position"] is False and forced.meta["zeropoint"] == ZP


def test_fit_position_near_cramer_rao(scene, free_position):
    n = scene["n"]
    t = free_position[:n]
    assert np.all(t["flags"] == 0)
    crb = cramer_rao(scene["x"], scene["y"], scene["flux"], TRUE_PSF)
    for k, name in ((1, "x"), (2, "y")):
        z = (t[name] - scene[name]) / crb[:, k]
        assert np.std(z) < 1.15  # acceptance: within 1.15x the Cramer-Rao bound
        assert abs(np.median(z)) < 0.1
        assert np.median(t[name + "_err"] / crb[:, k]) == pytest.approx(1.0, abs=0.05)
    pull = (t["flux"] - scene["flux"]) / t["flux_err"]
    assert 0.9 < np.std(pull) < 1.1
    assert abs(np.median(t["flux"] / scene["flux"]) - 1) < 0.003


def test_unmeasurable_positions_are_flagged_rows(scene, forced, free_position):
    for t in (forced, free_position):
        bad = t[-len(BAD_POSITIONS):]
        assert np.all(bad["flags"] == int(Flag.OFF_IMAGE))
        assert np.all(np.isnan(bad["flux"])) and np.all(np.isnan(bad["mag"]))
        assert list(bad["id"]) == list(scene["positions"]["id"][-len(BAD_POSITIONS):])
    # outside the PSF's region of validity (a PSF fitted on part of the image): flagged too
    part = PSFModel("moffat", TRUE_PSF.coef, (-0.5, 899.5, -0.5, NY - 0.5), degree=1)
    t = photometry(scene["image"], part, scene["positions"][: scene["n"]], gain=GAIN, read_noise=RN)
    beyond = scene["x"] > 899.5
    assert beyond.sum() > 300
    assert np.all(t["flags"][beyond] == int(Flag.OFF_IMAGE)) and np.all(np.isnan(t["flux"][beyond]))
    assert np.all(t["flags"][~beyond] == 0) and np.all(np.isfinite(t["flux"][~beyond]))


def test_magnitudes(scene, forced):
    t = forced
    pos = np.isfinite(t["flux"]) & (t["flux"] > 0)
    np.testing.assert_allclose(t["mag"][pos], ZP - 2.5 * np.log10(t["flux"][pos]))
    np.testing.assert_allclose(t["mag_err"][pos], 1.0857362 * t["flux_err"][pos] / t["flux"][pos], rtol=1e-6)
    sky = t[scene["n"]: scene["n"] + 40]
    assert np.all(np.isfinite(sky["flux"])) and np.all(sky["flags"] == 0)
    assert abs(np.median(sky["flux"] / sky["flux_err"])) < 0.5  # empty sky: flux consistent with 0
    neg = sky["flux"] <= 0
    assert neg.any() and np.all(np.isnan(sky["mag"][neg]))
    no_zp = photometry(scene["image"], TRUE_PSF, scene["positions"], gain=GAIN, read_noise=RN)
    assert np.all(np.isnan(no_zp["mag"])) and np.all(np.isnan(no_zp["mag_err"]))
    np.testing.assert_array_equal(no_zp["flux"], t["flux"])


def test_sky_positions_with_wcs(scene, forced):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [600.0, 615.0]
    w.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]
    n = scene["n"]
    ra, dec = w.pixel_to_world_values(scene["x"], scene["y"])
    pos = Table({"id": np.arange(n), "ra": ra, "dec": dec})
    t = photometry(scene["image"], TRUE_PSF, pos, wcs=w, gain=GAIN, read_noise=RN, zeropoint=ZP)
    np.testing.assert_allclose(t["x_init"], scene["x"], atol=1e-6)
    np.testing.assert_allclose(t["flux"], forced["flux"][:n], rtol=1e-4)
    np.testing.assert_allclose(t["ra"], ra, atol=1e-9)
    with pytest.raises(ValueError, match="no WCS"):
        photometry(scene["image"], TRUE_PSF, pos[:3], gain=GAIN)


def test_bad_arguments(scene):
    with pytest.raises(ValueError, match="odd"):
        photometry(scene["image"], TRUE_PSF, np.array([[500.0, 500.0]]), stamp=16)
    with pytest.raises(ValueError, match="x, y"):
        photometry(scene["image"], TRUE_PSF, {"a": [1.0]})
    with pytest.raises(ValueError, match="2-D"):
        photometry(scene["image"][None], TRUE_PSF, np.array([[500.0, 500.0]]))


def test_cli(scene, forced, tmp_path, capsys):
    img = tmp_path / "img.fits"
    hdr = fits.Header({"GAIN": GAIN, "READNOI": RN, "MAGZP": ZP})
    fits.PrimaryHDU(scene["image"], header=hdr).writeto(img)
    psf_path = tmp_path / "img.psf.fits"
    TRUE_PSF.write(psf_path)
    cat = tmp_path / "pos.csv"
    scene["positions"].write(cat, format="ascii.csv")
    out = tmp_path / "phot.ecsv"
    assert main(["photometry", str(img), "--psf", str(psf_path), "--positions", str(cat), "--out", str(out)]) == 0
    t = Table.read(out)
    np.testing.assert_allclose(t["flux"], forced["flux"], rtol=1e-6)
    np.testing.assert_array_equal(t["flags"], forced["flags"])
    np.testing.assert_allclose(t["mag"], forced["mag"], rtol=1e-6)
    # a PSF file of another format version: one clear line, exit code 2
    with fits.open(psf_path, mode="update") as h:
        h[0].header["PSFVERS"] = 7
    capsys.readouterr()
    assert main(["photometry", str(img), "--psf", str(psf_path), "--positions", str(cat)]) == 2
    err = capsys.readouterr().err
    assert "img.psf.fits" in err and "version 7" in err and "Traceback" not in err
    assert main(["photometry", str(img), "--psf", str(tmp_path / "none.psf.fits"), "--positions", str(cat)]) == 2
