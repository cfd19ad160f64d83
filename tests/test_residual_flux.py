"""The hybrid PSF's flux term (a residual surface linear in log flux) against a truth whose
core changes with the flux, and one whose core does not."""

import jax.numpy as jnp
import numpy as np
import pytest

from ztfpsf.flags import Flag
from ztfpsf.models import get_model
from ztfpsf.psf import PSFModel, fit_psf
from ztfpsf.psf.groups import flux_scale

GAIN, RN, SKY, SIZE, N = 6.0, 9.0, 150.0, 17, 400
ALPHA, FWHM, LG_REF = 2.6, 1.7, 4.0


def simulate(slope, seed=5):
    """Moffat stars of 14-18 mag whose fwhm changes by ``slope`` per decade of flux (a truth
    no flux-independent PSF describes), pixel-integrated exactly (gl8), with noise; and each
    star's true flux within 7 px."""
    rng = np.random.default_rng(seed)
    mag = rng.uniform(14.0, 18.0, N)
    flux = 10 ** (-0.4 * (mag - 26.0))
    fwhm = FWHM * (1 + slope * (np.log10(flux) - LG_REF))
    x, y = 8.0 + rng.uniform(-0.5, 0.5, N), 8.0 + rng.uniform(-0.5, 0.5, N)
    m = get_model("moffat", "gl8")
    img = np.asarray(m.image(jnp.asarray(flux), jnp.asarray(x), jnp.asarray(y), (jnp.asarray(fwhm), jnp.full(N, ALPHA)),
                             0.0, SIZE, SIZE)) + SKY
    data = ((rng.poisson(img * GAIN) + rng.normal(0, RN, img.shape)) / GAIN).astype(np.float32)
    gamma2 = fwhm**2 / (4 * (2 ** (1 / ALPHA) - 1))
    flux7 = flux * (1 - (1 + 49.0 / gamma2) ** (1 - ALPHA))
    origin = np.column_stack([rng.uniform(0, 3000, N), rng.uniform(0, 3000, N)]).round()
    return data, mag, flux7, origin


@pytest.fixture(scope="module")
def fits_():
    """Per truth (fwhm -3 % per decade of flux; none) the hybrid without and with its flux term."""
    out = {}
    for slope in (-0.03, 0.0):
        data, mag, flux7, origin = simulate(slope)
        common = dict(gain=GAIN, read_noise=RN, origin=origin, image_shape=(3080, 3072), mode="shared", dtype="float64", hybrid=True)
        out[slope] = (mag, flux7, fit_psf(data, **common), fit_psf(data, **common, residual_flux=True))
    return out


def _trend(mag, ratio, table):
    """Slope [mmag/mag] of the flux error against magnitude over the unflagged stars (reserve
    stars included) and its standard error."""
    good = (np.asarray(table["flags"]) & ~int(Flag.RESERVED)) == 0
    dm = -2.5 * np.log10(ratio[good]) * 1e3
    A = np.column_stack([np.ones(good.sum()), mag[good] - 16.0])
    coef, res, *_ = np.linalg.lstsq(A, dm, rcond=None)
    sigma = np.sqrt(res[0] / (good.sum() - 2))
    return coef[1], sigma * np.sqrt(np.linalg.inv(A.T @ A)[1, 1])


def test_flux_term_removes_the_trend_of_a_flux_dependent_core_and_invents_none(fits_):
    mag, flux7, (_, tp, sp), (psf, tf, sf) = fits_[-0.03]
    slope_p, err_p = _trend(mag, np.asarray(tp["flux"]) / flux7, tp)
    slope_f, err_f = _trend(mag, np.asarray(tf["flux"]) / flux7, tf)
    # measured: 8.5 +/- 0.35 mmag/mag without the term, 1.3 +/- 0.33 with it
    assert slope_p > 5 * err_p and slope_p > 5.0  # the flux-independent PSF: faint stars too faint
    assert abs(slope_f) < 4 * err_f and abs(slope_f) < slope_p / 4
    assert sf["chi2_dof_reserve"] < sp["chi2_dof_reserve"] - 0.01  # measured 1.025 -> 1.003
    assert psf.residual_flux == 1 and psf.flux_dependent
    # the model's core at the faint and bright ends of the range: the truth's within 0.5 %
    lo, hi = 10 ** np.array(psf.bf_range)
    for f in (lo, hi):
        fwhm = FWHM * (1 + -0.03 * (np.log10(f / psf.enclosed(1500.0, 1500.0)) - LG_REF))
        gamma2 = fwhm**2 / (4 * (2 ** (1 / ALPHA) - 1))
        truth = (1 - (1 + 1 / gamma2) ** (1 - ALPHA)) / (1 - (1 + 49 / gamma2) ** (1 - ALPHA))  # within 1 px / 7 px
        model = psf.enclosed(1500.0, 1500.0, radius=1.0, flux=f) / psf.enclosed(1500.0, 1500.0, flux=f)
        assert abs(model / truth - 1) < 0.005
    # no flux dependence in the truth: no trend with or without the term
    mag, flux7, (_, tp, _), (_, tf, _) = fits_[0.0]
    for t in (tp, tf):
        slope, err = _trend(mag, np.asarray(t["flux"]) / flux7, t)
        assert abs(slope) < 3 * err + 0.3


def test_flux_term_is_linear_in_log_flux_and_survives_its_file(tmp_path, fits_):
    *_, (psf, _, _) = fits_[-0.03]
    lo, hi = psf.bf_range
    x, y = 1500.0, 1500.0
    at = lambda f: psf.residual_nodes(x, y, flux=f)[0]
    f1, f2 = 10 ** (lo + 0.25 * (hi - lo)), 10 ** (lo + 0.75 * (hi - lo))
    mid = at(np.sqrt(f1 * f2))
    assert np.allclose(mid, 0.5 * (at(f1) + at(f2)), atol=1e-12)  # linear in log10 flux
    assert np.allclose(at(10 ** (hi + 1)), at(10**hi), atol=0) and not np.allclose(at(f1), at(f2))  # held beyond the range
    assert np.allclose(psf.residual_nodes(x, y)[0], at(psf.bf_ref), atol=1e-15)  # no flux: the reference
    # stamps at each flux are normalised to unit flux within FLUXRAD, and differ
    s1, s2 = psf.stamp(x, y, flux=f1), psf.stamp(x, y, flux=f2)
    assert np.abs(s1 - s2).max() > 1e-3
    # the catalogue's flux scale (linear in log flux) is the disc integral at the source's flux
    fs = flux_scale(psf, np.array([x, x]), np.array([y, y]), flux=np.array([f1, f2]))
    assert np.allclose(fs, [psf.enclosed(x, y, flux=f1), psf.enclosed(x, y, flux=f2)], rtol=1e-10)
    path = psf.write(tmp_path / "flux.psf.fits")
    back = PSFModel.read(path)
    assert back.residual_flux == 1 and back.bf_ref == pytest.approx(psf.bf_ref)
    assert np.allclose(back.stamp(x, y, flux=f2), s2, atol=1e-12)
    from astropy.io import fits

    with fits.open(path) as h:
        assert h[0].header["PSFVERS"] == 3 and h[0].header["RESFLUX"] == 1


def test_the_psf_figure_shows_the_flux_term(tmp_path, fits_):
    from PIL import Image

    from ztfpsf.plots._style import pixel_size
    from ztfpsf.plots.psf import compute_psf, plot_psf

    *_, (psf, _, _) = fits_[-0.03]
    v = compute_psf(psf)
    change, (lo, hi) = v["flux_change"], v["flux_range"]
    c = change.shape[0] // 2
    assert (lo, hi) == pytest.approx(psf.bf_range)
    assert change[c, c] > 1.0  # % of the peak: the bright stars' core is the sharper (the truth's fwhm shrinks)
    path = plot_psf(v, tmp_path / "psf.png")
    assert Image.open(path).size == pixel_size("psf_flux")
