"""Profiles: normalisation, pixel integration against a high-order reference, and the
bias that evaluating at pixel centres would cause (which pixel integration removes)."""

import jax.numpy as jnp
import numpy as np
import pytest

from ztfpsf import fit_stamps
from ztfpsf.models import get_model
from ztfpsf.simulate import simulate_stamps

N = 61
CASES = [
    ("gaussian", (0.9, 1.2, 0.3)),
    ("gaussian", (0.85, 0.85, 0.0)),
    ("moffat", (2.0, 2.5)),
    ("elliptical_moffat", (2.0, 3.0, 0.15, -0.1)),
]


def render(name, integration, shape, x=30.3, y=29.8):
    return np.asarray(get_model(name, integration).image(1.0, x, y, shape, 0.0, N, N))


@pytest.mark.parametrize("name,shape", CASES)
def test_profile_is_normalised(name, shape):
    total = render(name, "gl8", shape).sum()
    # a Moffat with alpha 2.5 leaves (1 + r^2/g^2)^(1-alpha) ~ 1.5e-4 of its flux beyond r = 30 px
    assert total == pytest.approx(1.0, abs=3e-4)


@pytest.mark.parametrize("name,shape", CASES)
def test_taylor4_matches_reference_integral(name, shape):
    ref = render(name, "gl12", shape)
    taylor = render(name, "taylor4", shape)
    centre = render(name, "center", shape)
    err_taylor = np.abs(taylor - ref).max() / ref.max()
    err_centre = np.abs(centre - ref).max() / ref.max()
    assert err_taylor < 2e-3
    assert err_centre > 0.05  # the point model is wrong by >5 % of the peak at FWHM ~2 px
    assert err_taylor < err_centre / 30


@pytest.mark.parametrize("shape", [(0.9, 1.2, 0.0), (0.7, 0.7, 0.0)])
def test_gaussian_erf_is_exact_without_correlation(shape):
    assert np.abs(render("gaussian", "erf", shape) - render("gaussian", "gl16", shape)).max() < 1e-9


def test_gaussian_erf_with_correlation():
    shape = (0.9, 1.2, 0.4)
    assert np.abs(render("gaussian", "erf", shape) - render("gaussian", "gl16", shape)).max() < 1e-5


def test_shape_parameter_round_trip():
    for name, shape in CASES:
        m = get_model(name)
        back = m.shape_to_physical(m.shape_to_internal(tuple(jnp.asarray(s) for s in shape)))
        np.testing.assert_allclose(np.array(back, dtype=float), shape, atol=1e-12)


@pytest.mark.parametrize("name,shape", [("moffat", (2.3, 3.1)), ("gaussian", (1.1, 1.1, 0.0))])
def test_fwhm_is_the_full_width_at_half_maximum(name, shape):
    m = get_model(name, "center")
    fwhm = float(m.fwhm(tuple(jnp.asarray(s) for s in shape)))
    at = lambda r: float(np.asarray(m.image(1.0, -r, 0.0, shape, 0.0, 1, 1)).ravel()[0])
    assert at(fwhm / 2) / at(0.0) == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("name,shape", [("moffat", (3.1, 3e6)), ("elliptical_moffat", (3.1, 3e6, 0.1, -0.05))])
@pytest.mark.parametrize("integration", ["adaptive", "taylor4"])
def test_moffat_at_the_gaussian_limit_stays_finite_in_float32(name, shape, integration):
    """Plate stars run a Moffat's alpha to 1e5-1e6 and beyond (their wings are Gaussian): the box
    expansion's 6th Q-derivative grows like alpha**6 and overflowed float32 from ~3e6 (NaN fits) until
    the derivatives were scaled by the form's curvature."""
    m = get_model(name, integration)
    f32 = lambda v: jnp.asarray(v, jnp.float32)
    img = np.asarray(m.image(f32(1.0), f32(30.3), f32(29.8), tuple(f32(v) for v in shape), f32(0.0), N, N))
    assert img.dtype == np.float32 and np.all(np.isfinite(img))
    assert img.sum() == pytest.approx(1.0, abs=0.03)  # float32 rounds 1 + r**2/gamma**2 (~1e-6) here
    if name == "moffat":  # float64: the Gaussian of the same fwhm, to the Moffat's 1/alpha
        sigma = shape[0] / 2.3548
        gauss = np.asarray(get_model("gaussian", "gl12").image(1.0, 30.3, 29.8, (sigma, sigma, 0.0), 0.0, N, N))
        img = np.asarray(m.image(1.0, 30.3, 29.8, shape, 0.0, N, N))
        assert np.abs(img - gauss).max() < 1e-4 * gauss.max()


def test_unknown_model_and_integration_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model"):
        get_model("airy")
    with pytest.raises(ValueError, match="unknown pixel integration"):
        get_model("moffat", "simpson")
    with pytest.raises(ValueError, match="erf"):
        get_model("moffat", "erf")
    with pytest.raises(ValueError, match="adaptive"):
        get_model("gaussian", "adaptive")  # the Gaussian's erf integral is exact already
    assert get_model("moffat").integration == get_model("elliptical_moffat").integration == "adaptive"


@pytest.fixture(scope="module")
def bright_ztf_like_stars():
    # noise-free in effect (very bright) to isolate the model bias from the noise
    return simulate_stamps(400, mag_range=(12.0, 12.5), shape={"fwhm": 2.0, "alpha": 2.5}, seed=11)


def test_pixel_integration_removes_centre_evaluation_bias(bright_ztf_like_stars):
    data, var, truth = bright_ztf_like_stars
    centre = fit_stamps(data, var, integration="center", dtype="float64")
    taylor = fit_stamps(data, var, integration="taylor4", dtype="float64")
    flux_bias = lambda t: np.median(t["flux"] / truth["flux"]) - 1
    fwhm_bias = lambda t: np.median(t["fwhm"] / truth["fwhm"]) - 1
    # evaluating the Moffat at pixel centres biases a 2 px FWHM by several percent ...
    assert fwhm_bias(centre) > 0.04
    assert abs(flux_bias(centre)) > 0.004
    # ... the pixel-integrated model is within the accuracy targets (0.5 % fwhm, 0.2 % flux)
    assert abs(fwhm_bias(taylor)) < 0.001
    assert abs(flux_bias(taylor)) < 0.001
