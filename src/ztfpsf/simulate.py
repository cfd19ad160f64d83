"""Simulated stars with known truth: stamps for tests and benchmarks.

Stars are rendered with an 8x8 Gauss-Legendre pixel integral (independent of the fitter's
Taylor expansion), then given Poisson noise in electrons and Gaussian read noise, and
converted back to ADU. ZTF-like defaults: gain 6.2 e-/ADU, read noise 8 e-, zero point
26.2, sky 150 ADU, FWHM 1.8-2.6 px.
"""

import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from .models import get_model

__all__ = ["simulate_stamps", "mag_to_flux", "ZTF_GAIN", "ZTF_READ_NOISE", "ZTF_ZEROPOINT"]

ZTF_GAIN = 6.2
ZTF_READ_NOISE = 8.0
ZTF_ZEROPOINT = 26.2


def mag_to_flux(mag, zeropoint=ZTF_ZEROPOINT):
    """Total flux [ADU] of a star of magnitude ``mag``."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - zeropoint))


def _shape_draws(model, n, rng, fwhm_range, alpha_range, ellipticity):
    fwhm = rng.uniform(*fwhm_range, n)
    if model.name == "gaussian":
        sigma = fwhm / 2.3548200450309493
        ratio = np.sqrt(1.0 + rng.uniform(-ellipticity, ellipticity, n))
        rho = rng.uniform(-ellipticity, ellipticity, n)
        return {"sigma_x": sigma * ratio, "sigma_y": sigma / ratio, "rho": rho}
    shape = {"fwhm": fwhm, "alpha": rng.uniform(*alpha_range, n)}
    if model.name == "elliptical_moffat":
        shape["e1"] = rng.uniform(-ellipticity, ellipticity, n)
        shape["e2"] = rng.uniform(-ellipticity, ellipticity, n)
    return shape


def simulate_stamps(
    n,
    *,
    model="moffat",
    size=17,
    mag_range=(14.0, 18.0),
    fwhm_range=(1.8, 2.6),
    alpha_range=(2.5, 4.0),
    ellipticity=0.1,
    shape=None,
    sky=150.0,
    gain=ZTF_GAIN,
    read_noise=ZTF_READ_NOISE,
    zeropoint=ZTF_ZEROPOINT,
    max_offset=0.5,
    seed=0,
):
    """Simulate ``n`` noisy star stamps of ``size x size`` pixels with known truth.

    Returns ``(data, variance, truth)``: data in ADU (sky not subtracted), the true
    per-pixel variance, and a table with ``mag, flux, x, y, background`` and the shape
    parameters. ``shape`` (dict of scalars or arrays) overrides the drawn shape.
    """
    rng = np.random.default_rng(seed)
    m = get_model(model, "gl8")
    mag = rng.uniform(*mag_range, n)
    flux = mag_to_flux(mag, zeropoint)
    c = (size - 1) / 2.0
    x = c + rng.uniform(-max_offset, max_offset, n)
    y = c + rng.uniform(-max_offset, max_offset, n)
    params = _shape_draws(m, n, rng, fwhm_range, alpha_range, ellipticity)
    for k, v in (shape or {}).items():
        params[k] = np.broadcast_to(np.asarray(v, dtype=float), (n,)).copy()
    background = np.full(n, float(sky))
    shape_t = tuple(jnp.asarray(params[k]) for k in m.shape_names)
    image = np.asarray(m.image(jnp.asarray(flux), jnp.asarray(x), jnp.asarray(y), shape_t, jnp.asarray(background), size, size))
    electrons = rng.poisson(np.clip(image, 0, None) * gain).astype(float)
    data = (electrons + rng.normal(0.0, read_noise, image.shape)) / gain
    variance = image / gain + (read_noise / gain) ** 2
    truth = Table({"mag": mag, "flux": flux, "x": x, "y": y, "background": background})
    for k in m.shape_names:
        truth[k] = params[k]
    truth["fwhm"] = np.asarray(m.fwhm(shape_t))
    truth.meta.update(model=m.name, gain=gain, read_noise=read_noise, zeropoint=zeropoint, sky=sky, seed=seed)
    return data, variance, truth
