"""Small symmetric linear algebra on batch-first arrays, unrolled at trace time.

A matrix is a dict ``{(i, j): array}`` for ``i >= j`` whose entries are arrays over the
stars of a batch. Unrolling the 4-8 parameter Cholesky into elementwise operations keeps
every star's solve vectorised; XLA's batched ``linalg.solve`` on CPU is far slower for
such small matrices (jax#11321).

A larger system (a group of sources fitted together, tens of parameters) is passed as one
stacked array ``(batch, n, n)`` instead of a dict: the unrolled program would grow as
``n**3``, so :func:`solve` and :func:`inverse` factorise it with XLA's batched Cholesky,
with the same scaling, damping and ``ok``. :data:`UNROLL_MAX` is the size up to which a
caller should prefer the dict.
"""

import jax
import jax.numpy as jnp

__all__ = ["cholesky", "solve", "inverse", "whitening", "to_dense"]

_TINY = 1e-30
#: Largest system worth unrolling (dict form); larger ones are passed as stacked arrays.
UNROLL_MAX = 8


def cholesky(A, n):
    """Lower Cholesky factor of the symmetric ``A``; ``ok`` is False where A is not positive definite."""
    L = {}
    ok = True
    for j in range(n):
        d = A[j, j] - sum(L[j, k] * L[j, k] for k in range(j))
        ok = ok & (d > 0)
        L[j, j] = jnp.sqrt(jnp.maximum(d, _TINY))
        inv = 1.0 / L[j, j]
        for i in range(j + 1, n):
            L[i, j] = (A[i, j] - sum(L[i, k] * L[j, k] for k in range(j))) * inv
    return L, ok


def _forward(L, b, n):
    z = []
    for i in range(n):
        z.append((b[i] - sum(L[i, k] * z[k] for k in range(i))) / L[i, i])
    return z


def _backward(L, z, n):
    x = [None] * n
    for i in reversed(range(n)):
        x[i] = (z[i] - sum(L[k, i] * x[k] for k in range(i + 1, n))) / L[i, i]
    return x


def _dense_factor(A, n, damping=None):
    """Jacobi scales ``s (batch, n)``, Cholesky factors of the scaled (damped) stacked
    matrices (the identity where not positive definite) and ``ok``."""
    s = jax.lax.rsqrt(jnp.maximum(jnp.diagonal(A, axis1=-2, axis2=-1), _TINY))
    eye = jnp.eye(n, dtype=A.dtype)
    As = A * s[..., :, None] * s[..., None, :]
    if damping is not None:
        As = As + jnp.asarray(damping)[..., None, None] * eye
    L = jnp.linalg.cholesky(As)
    ok = jnp.all(jnp.isfinite(L), axis=(-2, -1)) & jnp.all(jnp.diagonal(L, axis1=-2, axis2=-1) > 0, axis=-1)
    return s, jnp.where(ok[..., None, None], L, eye), ok


def _cho_solve(L, rhs):
    """``(L L^T)^-1 rhs`` for stacked factors ``L (..., n, n)`` and ``rhs (..., n, m)``."""
    z = jax.lax.linalg.triangular_solve(L, rhs, left_side=True, lower=True)
    return jax.lax.linalg.triangular_solve(L, z, left_side=True, lower=True, transpose_a=True)


def solve(A, b, n, damping=None):
    """Solve ``(A + damping * diag(A)) x = b`` with Jacobi scaling (Marquardt's form).

    Scaling by ``diag(A)`` first makes the float32 factorisation well conditioned when
    parameters differ by orders of magnitude (flux vs. position). ``A``: the dict, or a
    stacked array ``(batch, n, n)``; ``b``: a list of ``n`` arrays; returns a list.
    """
    if not isinstance(A, dict):
        s, L, ok = _dense_factor(A, n, damping)
        x = _cho_solve(L, (jnp.stack(list(b), axis=-1) * s)[..., None])[..., 0] * s
        return [x[..., i] for i in range(n)], ok
    s = [jax.lax.rsqrt(jnp.maximum(A[i, i], _TINY)) for i in range(n)]
    As = {}
    for i in range(n):
        for j in range(i + 1):
            As[i, j] = A[i, j] * s[i] * s[j]
        if damping is not None:
            As[i, i] = As[i, i] + damping
    L, ok = cholesky(As, n)
    x = _backward(L, _forward(L, [b[i] * s[i] for i in range(n)], n), n)
    return [x[i] * s[i] for i in range(n)], ok


def inverse(A, n):
    """Inverse of the symmetric positive definite ``A`` (same dict layout, or a stacked
    array for a stacked array) and ``ok``."""
    if not isinstance(A, dict):
        s, L, ok = _dense_factor(A, n)
        eye = jnp.broadcast_to(jnp.eye(n, dtype=A.dtype), L.shape)
        return _cho_solve(L, eye) * s[..., :, None] * s[..., None, :], ok
    s = [jax.lax.rsqrt(jnp.maximum(A[i, i], _TINY)) for i in range(n)]
    As = {(i, j): A[i, j] * s[i] * s[j] for i in range(n) for j in range(i + 1)}
    L, ok = cholesky(As, n)
    zero = jnp.zeros_like(A[0, 0])
    inv = {}
    for k in range(n):
        e = [zero + (1.0 if i == k else 0.0) for i in range(n)]
        col = _backward(L, _forward(L, e, n), n)
        for i in range(k, n):
            inv[i, k] = col[i] * s[i] * s[k]
    return inv, ok


def whitening(A, n):
    """Map ``z -> dp`` with ``dp^T A dp = z^T z`` (``dp = S L^-T z``, ``S A S = L L^T``).

    Non-positive-definite stars fall back to the Jacobi scaling alone.
    """
    s = [jax.lax.rsqrt(jnp.maximum(A[i, i], _TINY)) for i in range(n)]
    As = {(i, j): A[i, j] * s[i] * s[j] for i in range(n) for j in range(i + 1)}
    L, ok = cholesky(As, n)
    one = jnp.ones_like(A[0, 0])
    L = {k: jnp.where(ok, v, one if k[0] == k[1] else 0.0 * one) for k, v in L.items()}

    def unwhiten(z):
        x = _backward(L, [z[:, i] for i in range(n)], n)
        return jnp.stack([x[i] * s[i] for i in range(n)], axis=1)

    return unwhiten


def to_dense(A, n):
    """Stack the dict into a dense ``(..., n, n)`` array."""
    rows = [jnp.stack([A[max(i, j), min(i, j)] for j in range(n)], axis=-1) for i in range(n)]
    return jnp.stack(rows, axis=-2)
