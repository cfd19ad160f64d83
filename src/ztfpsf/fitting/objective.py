"""Weighted least-squares objective of a batch of stamps (stars on the leading axis).

Stamps are flattened: arrays are ``(stars, pixels)`` and :func:`pixel_grid` gives the
pixels' coordinates. Reducing over one contiguous axis is markedly faster in XLA on a
CPU than over the two axes of ``(stars, ny, nx)``.

The parameter vector of a star is ``theta = [flux, x, y, *shape_internal, background]``
(:attr:`Model.param_names` order, shape in the model's internal form). ``free`` is a
static tuple of the indices that are fitted; the others are held at their value in
``theta``. Pure JAX, no I/O.
"""

import jax
import jax.numpy as jnp

__all__ = ["pixel_grid", "flatten", "model_image", "chi2", "normal_equations", "noise_weight"]


def pixel_grid(ny, nx, dtype):
    """Flattened pixel-centre coordinates (0-based, centres at integers) of a stamp."""
    yy, xx = jnp.mgrid[0:ny, 0:nx]
    return xx.reshape(-1).astype(dtype), yy.reshape(-1).astype(dtype)


def flatten(a):
    """``(stars, ny, nx)`` -> ``(stars, ny * nx)``."""
    return a.reshape(a.shape[0], -1)


def _col(v):
    return v[:, None]


def _shape(model, theta):
    """The model's internal shape from theta: a tuple of ``(N, 1)`` columns, or what the
    model's ``unpack`` makes of the block (the hybrid PSF's residual nodes)."""
    block = theta[:, 3: 3 + model.n_shape]
    unpack = getattr(model, "unpack", None)
    return unpack(block) if unpack else tuple(_col(block[:, k]) for k in range(model.n_shape))


def _profile(model, theta, xx, yy):
    return model.profile(xx - _col(theta[:, 1]), yy - _col(theta[:, 2]), _shape(model, theta))


def model_image(model, theta, xx, yy):
    """Model stamps ``flux * profile + background`` for every star of the batch."""
    return _col(theta[:, 0]) * _profile(model, theta, xx, yy) + _col(theta[:, -1])


def chi2(model, theta, data, weight, xx, yy):
    """Per-star chi2 (autodiff-friendly; used by the gradient-based methods)."""
    r = data - model_image(model, theta, xx, yy)
    return jnp.sum(weight * r * r, axis=1)


def _profile_and_jacobian(model, theta, nonlinear, xx, yy):
    """Profile and its derivatives w.r.t. the free nonlinear parameters (x, y, shape).

    Forward-mode derivatives of the elementwise profile, one tangent per parameter,
    batched with vmap so that the primal (the expensive powers) is computed once.
    """
    if not nonlinear:
        return _profile(model, theta, xx, yy), []
    idx = jnp.asarray(nonlinear)

    def prof(p):
        return _profile(model, theta.at[:, idx].set(p), xx, yy)

    p0 = theta[:, idx]
    basis = jnp.eye(len(nonlinear), dtype=theta.dtype)
    P, dP = jax.vmap(
        lambda t: jax.jvp(prof, (p0,), (jnp.broadcast_to(t, p0.shape),)), out_axes=(None, 0)
    )(basis)
    return P, [dP[k] for k in range(len(nonlinear))]


def normal_equations(model, free, theta, data, weight, xx, yy):
    """chi2, ``A = J^T W J`` (dict, lower triangle) and ``g = J^T W r`` over ``free``."""
    n_par = theta.shape[1]
    nonlinear = tuple(i for i in free if 0 < i < n_par - 1)
    P, dP = _profile_and_jacobian(model, theta, nonlinear, xx, yy)
    flux = _col(theta[:, 0])
    r = data - (flux * P + _col(theta[:, -1]))
    wr = weight * r
    cols = []
    dPi = iter(dP)
    for i in free:
        if i == 0:
            cols.append(P)
        elif i == n_par - 1:
            cols.append(None)  # d model / d background = 1
        else:
            cols.append(flux * next(dPi))
    red = lambda z: jnp.sum(z, axis=1)
    g = [red(wr) if c is None else red(c * wr) for c in cols]
    A = {}
    for i, ci in enumerate(cols):
        wci = weight if ci is None else weight * ci
        for j in range(i + 1):
            cj = cols[j]
            A[i, j] = red(wci) if cj is None else red(wci * cj)
    return red(wr * r), A, g


def noise_weight(model_or_data, valid, gain, read_noise, sky):
    """Inverse variance in ADU**-2 from gain [e-/ADU], read noise [e-] and the sky level.

    ``variance = (max(level, 0) + sky) / gain + (read_noise / gain)**2``, where ``level``
    is the model (or data) in ADU and ``sky`` any sky level already subtracted from it.
    """
    g = _col(gain)
    var = (jnp.maximum(model_or_data, 0.0) + _col(sky)) / g + _col(read_noise / gain) ** 2
    return jnp.where(valid, 1.0 / jnp.maximum(var, 1e-30), 0.0)
