"""PSFModel: evaluation, stamps, the PSF file (write/read, versions, bad files)."""

import numpy as np
import pytest
from astropy.io import fits

from ztfpsf.psf.basis import basis_terms, legendre_basis
from ztfpsf.models import get_model
from ztfpsf.psf.model import FORMAT_VERSION, PSFFileError, PSFModel

NX, NY = 3072, 3080
BOUNDS = (-0.5, NX - 0.5, -0.5, NY - 0.5)


@pytest.fixture(scope="module")
def varying():
    """Elliptical Moffat, degree 2, with a covariance: every code path of the file."""
    rng = np.random.default_rng(3)
    coef = np.zeros((4, 6))
    coef[:, 0] = [np.log(2.2), np.log(2.0), 0.03, -0.02]
    coef[:, 1:] = rng.normal(0, 0.02, (4, 5))
    a = rng.normal(0, 1e-3, (24, 24))
    cov = a @ a.T
    return PSFModel("elliptical_moffat", coef, BOUNDS, degree=2, cov=cov, image_shape=(NY, NX),
                    meta={"image": "ztf_x_sciimg.fits", "n_fit": 900, "chi2_dof_train": 1.01})


def test_basis_is_legendre():
    assert basis_terms(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    xn, yn = np.array([0.3, -1.0]), np.array([0.5, 1.0])
    T = legendre_basis(xn, yn, 2)
    p2 = lambda t: 1.5 * t * t - 0.5
    expect = np.stack([np.ones(2), xn, yn, p2(xn), xn * yn, p2(yn)], axis=1)
    np.testing.assert_allclose(T, expect, rtol=1e-14)


def test_constant_psf_shape_everywhere():
    psf = PSFModel.constant("moffat", {"fwhm": 2.3, "alpha": 2.7}, BOUNDS)
    x, y = np.array([0.0, 1500.2, 3071.0]), np.array([0.0, 10.0, 3079.0])
    np.testing.assert_allclose(psf.fwhm(x, y), 2.3, rtol=1e-12)
    np.testing.assert_allclose(psf.alpha(x, y), 2.7, rtol=1e-12)
    np.testing.assert_allclose(psf.ellipticity(x, y), 0.0)
    assert psf.mode == "shared" and psf.degree == 0


def test_evaluation_matches_polynomial(varying):
    x, y = np.array([100.0, 2000.0]), np.array([3000.0, 5.0])
    xn, yn = 2 * (x + 0.5) / NX - 1, 2 * (y + 0.5) / NY - 1
    u = legendre_basis(xn, yn, 2) @ varying.coef.T
    np.testing.assert_allclose(varying.fwhm(x, y), np.exp(u[:, 0]), rtol=1e-12)
    np.testing.assert_allclose(varying.alpha(x, y), 1 + np.exp(u[:, 1]), rtol=1e-12)
    e1, e2 = varying.ellipticity(x, y, components=True)
    eta = np.hypot(u[:, 2], u[:, 3])
    np.testing.assert_allclose(e1, u[:, 2] * np.tanh(eta) / eta, rtol=1e-9)
    np.testing.assert_allclose(varying.ellipticity(x, y), np.tanh(eta), rtol=1e-9)
    # arrays in, arrays out, shapes kept
    assert varying.fwhm(np.zeros((2, 3)), np.zeros((2, 3))).shape == (2, 3)


def test_outside_validity_is_nan(varying):
    f = varying.fwhm([-1.0, 10.0, 3072.0], [10.0, 10.0, 10.0])
    assert np.isnan(f[0]) and np.isfinite(f[1]) and np.isnan(f[2])
    assert np.isnan(varying.stamp(-3.0, 50.0)).all()
    assert np.isfinite(varying.fwhm(-1.0, 10.0, extrapolate=True))


def test_stamp_position_and_normalisation(varying):
    x, y = 1234.3, 777.8
    img, (x0, y0) = varying.stamp(x, y, shape=(17, 17), return_origin=True)
    assert (x0, y0) == (1234 - 8, 778 - 8)
    assert img.shape == (17, 17)
    # the star's centroid sits at (x - x0, y - y0) in the stamp (large stamp: wings included)
    big, (bx0, by0) = varying.stamp(x, y, shape=(101, 101), return_origin=True)
    # unit flux within the PSF's flux radius (7 px), checked by exact aperture photometry
    from photutils.aperture import CircularAperture, aperture_photometry

    within = aperture_photometry(big, CircularAperture([(x - bx0, y - by0)], r=varying.flux_radius))["aperture_sum"][0]
    assert within == pytest.approx(1.0, abs=2e-3)
    frac = varying.enclosed(x, y)
    assert 0.95 < frac < 0.999
    assert 0.995 < big.sum() * frac < 1.0  # the total: the 101x101 stamp misses a bit of the wings
    assert 0.97 < img.sum() * frac < big.sum() * frac
    yy, xx = np.mgrid[0:101, 0:101]
    core = np.hypot(xx - (x - bx0), yy - (y - by0)) < 6
    cx = np.sum(big * xx * core) / np.sum(big * core)
    assert abs(cx - (x - bx0)) < 0.02  # (ellipticity makes the truncated centroid move slightly)
    # identical to the model rendered at the PSF's shape there
    m = get_model("elliptical_moffat")
    s = varying.shape(x, y)
    ref = np.asarray(m.image(1.0, x - x0, y - y0, tuple(s[k] for k in m.shape_names), 0.0, 17, 17))
    np.testing.assert_allclose(img * frac, ref, rtol=1e-6, atol=1e-12)
    many = varying.stamp(np.array([x, 10.0]), np.array([y, 20.0]))
    assert many.shape == (2, 17, 17)
    np.testing.assert_allclose(many[0], img)


def test_shape_err_from_covariance(varying):
    x, y = np.array([500.0]), np.array([600.0])
    err = varying.shape_err(x, y)
    # fwhm = exp(u0): sigma_fwhm = fwhm * sqrt(T C00 T)
    T = varying.basis(x, y)[0]
    var_u0 = T @ varying.cov[:6, :6] @ T
    np.testing.assert_allclose(err["fwhm"], varying.fwhm(x, y) * np.sqrt(var_u0), rtol=1e-6)


def test_file_roundtrip(varying, tmp_path):
    path = tmp_path / "img.psf.fits"
    varying.write(path)
    back = PSFModel.read(path)
    np.testing.assert_array_equal(back.coef, varying.coef)
    np.testing.assert_array_equal(back.cov, varying.cov)
    assert back.bounds == varying.bounds and back.degree == 2 and back.image_shape == (NY, NX)
    assert back.model == varying.model
    assert back.meta["image"] == "ztf_x_sciimg.fits" and back.meta["n_fit"] == 900
    h = fits.getheader(path)
    assert h["PSFVERS"] == FORMAT_VERSION and h["MODEL"] == "elliptical_moffat" and h["PSFMODE"] == "varying"
    assert h["NFIT"] == 900 and h["CHI2TRN"] == pytest.approx(1.01)
    x = np.array([3.0, 3000.0])
    np.testing.assert_array_equal(back.fwhm(x, x), varying.fwhm(x, x))
    with pytest.raises(FileExistsError):
        varying.write(path)
    varying.write(path, overwrite=True)


def test_file_errors(varying, tmp_path):
    path = tmp_path / "old.psf.fits"
    varying.write(path)
    with fits.open(path, mode="update") as h:
        h[0].header["PSFVERS"] = 99
    with pytest.raises(PSFFileError, match=r"old\.psf\.fits.*version 99.*reads versions \(1, 2, 3\)"):
        PSFModel.read(path)
    other = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4))).writeto(other)
    with pytest.raises(PSFFileError, match="not a ztfpsf PSF file"):
        PSFModel.read(other)
    with pytest.raises(PSFFileError, match="no such PSF file"):
        PSFModel.read(tmp_path / "missing.psf.fits")
    junk = tmp_path / "junk.psf.fits"
    junk.write_bytes(b"SIMPLE  =  this is not fits" * 10)
    with pytest.raises(PSFFileError, match="junk.psf.fits"):
        PSFModel.read(junk)


def test_bad_construction():
    with pytest.raises(ValueError, match="coef must have shape"):
        PSFModel("moffat", np.zeros((2, 3)), BOUNDS, degree=2)
    with pytest.raises(ValueError, match="bounds"):
        PSFModel("moffat", np.zeros((2, 1)), (10, 0, 0, 10))
    with pytest.raises(ValueError, match="no alpha"):
        PSFModel.constant("gaussian", {"sigma_x": 1.0, "sigma_y": 1.0, "rho": 0.0}, BOUNDS).alpha(1.0, 1.0)
