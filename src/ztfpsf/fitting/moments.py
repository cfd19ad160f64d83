"""Initial guesses from the stamps' pixels (pure JAX, batched).

background: median of the stamp's border pixels; flux: background-subtracted sum;
centre: the given position, else a 3x3 centroid around the brightest pixel of the
stamp's central half; width: the FWHM of the Gaussian with the same flux and peak.
"""

import jax.numpy as jnp

from ..models import FWHM_PER_SIGMA

__all__ = ["initial_guess"]


def _border(a):
    return jnp.concatenate([a[:, 0, :], a[:, -1, :], a[:, 1:-1, 0], a[:, 1:-1, -1]], axis=1)


def initial_guess(data, valid, x_init, y_init, has_init):
    """Per-star ``flux, x, y, fwhm, background`` guesses (arrays over stars)."""
    n, ny, nx = data.shape
    d = jnp.where(valid, data, jnp.nan)
    bg = jnp.nanmedian(_border(d), axis=1)
    bg = jnp.where(jnp.isfinite(bg), bg, jnp.nanmin(d, axis=(1, 2)))  # border fully masked
    bg = jnp.where(jnp.isfinite(bg), bg, 0.0)
    s = jnp.where(valid, data - bg[:, None, None], 0.0)
    flux = jnp.sum(s, axis=(1, 2))

    # brightest pixel of the central half, then a 3x3 centroid of the positive part
    yy, xx = jnp.mgrid[0:ny, 0:nx]
    central = (jnp.abs(xx - (nx - 1) / 2) <= nx / 4) & (jnp.abs(yy - (ny - 1) / 2) <= ny / 4)
    k = jnp.argmax(jnp.where(central, s, -jnp.inf).reshape(n, -1), axis=1)
    py, px = (k // nx).astype(data.dtype), (k % nx).astype(data.dtype)
    near = (jnp.abs(xx - px[:, None, None]) <= 1) & (jnp.abs(yy - py[:, None, None]) <= 1)
    w = jnp.where(near, jnp.maximum(s, 0.0), 0.0)
    wsum = jnp.sum(w, axis=(1, 2))
    safe = jnp.where(wsum > 0, wsum, 1.0)
    cx = jnp.where(wsum > 0, jnp.sum(w * xx, axis=(1, 2)) / safe, px)
    cy = jnp.where(wsum > 0, jnp.sum(w * yy, axis=(1, 2)) / safe, py)
    x = jnp.where(has_init, x_init, cx)
    y = jnp.where(has_init, y_init, cy)

    # peak near the centre -> Gaussian-equivalent FWHM, kept within a sane range
    ix, iy = jnp.round(x), jnp.round(y)
    at = (jnp.abs(xx - ix[:, None, None]) <= 1) & (jnp.abs(yy - iy[:, None, None]) <= 1)
    peak = jnp.max(jnp.where(at, s, -jnp.inf), axis=(1, 2))
    sigma2 = flux / (2.0 * jnp.pi * jnp.where(peak > 0, peak, 1.0))
    fwhm = FWHM_PER_SIGMA * jnp.sqrt(jnp.where((peak > 0) & (flux > 0), sigma2, 1.0))
    fwhm = jnp.clip(jnp.where(jnp.isfinite(fwhm), fwhm, 2.0), 1.0, min(ny, nx) / 3.0)
    return flux, x, y, fwhm, bg
