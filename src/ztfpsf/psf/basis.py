"""Polynomial basis over the image: Legendre terms ``P_px(xn) P_py(yn)`` of total degree
<= D in coordinates normalised to [-1, 1] over the PSF's region (numpy, host side)."""

import numpy as np

__all__ = ["basis_terms", "legendre_basis", "normalise"]


def basis_terms(degree):
    """``[(px, py), ...]``: Legendre terms ``P_px(x) P_py(y)`` of total degree <= ``degree``.

    Ordered by total degree, then by decreasing power of x: ``(0,0), (1,0), (0,1), (2,0),
    (1,1), (0,2), ...``; ``(degree + 1)(degree + 2)/2`` terms.
    """
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0; got {degree}")
    return [(d - j, j) for d in range(degree + 1) for j in range(d + 1)]


def normalise(x, y, bounds):
    """Image coordinates -> [-1, 1] over ``bounds = (xmin, xmax, ymin, ymax)``."""
    xmin, xmax, ymin, ymax = bounds
    xn = 2.0 * (np.asarray(x, dtype=np.float64) - xmin) / (xmax - xmin) - 1.0
    yn = 2.0 * (np.asarray(y, dtype=np.float64) - ymin) / (ymax - ymin) - 1.0
    return xn, yn


def _legendre(t, n):
    """``[P_0(t), ..., P_n(t)]`` by the three-term recurrence (numpy or jax arrays)."""
    p = [t * 0.0 + 1.0]
    if n >= 1:
        p.append(t)
    for k in range(1, n):
        p.append(((2 * k + 1) * t * p[k] - k * p[k - 1]) / (k + 1))
    return p


def legendre_basis(xn, yn, degree):
    """Basis values ``(N, n_terms)`` at normalised coordinates (numpy in, numpy out)."""
    xn, yn = np.asarray(xn, dtype=np.float64), np.asarray(yn, dtype=np.float64)
    px, py = _legendre(xn, degree), _legendre(yn, degree)
    return np.stack([px[i] * py[j] for i, j in basis_terms(degree)], axis=-1)
