"""Neighbours fitted together: groups of sources measured with a fixed PSF.

Sources closer than a linking length are grouped (friends of friends) and each group is
fitted as one model, ``sum_k flux_k P_k(x - x_k, y - y_k) + background``, on a square
window that covers every member's fit disc: ``flux, x, y`` per member and one background,
the PSF's shape held at each member's position (analytic, or hybrid with its residual
nodes). Groups are padded to a few sizes (:data:`SIZES` members, each with its window
size) with a validity mask, so that a whole image compiles a handful of programs, and
every group of one size runs through one compiled program (the Levenberg-Marquardt of
:mod:`ztfpsf.fitting.lm`, one group per row, batched by :mod:`ztfpsf.fitting.batching`).

The parameter vector of a group of ``K`` (padded) members (:class:`GroupModel`):
``[flux_1, x_1, y_1, ..., flux_K, x_K, y_K, background | x0_1, y0_1, ..., x0_K, y0_K |
valid_1..K | held_1..K | shape_1, ..., shape_K]``: the first ``3K + 1`` are fitted, the
rest ride along (the prior centres, which members are real, which members' positions are
held at their start, the PSF at each member). Positions
have a weak Gaussian prior (``prior_sigma`` px) around their start (the detection), so
that a faint member, whose position the pixels hardly constrain, cannot make the whole
group's normal matrix singular; for any star with S/N above a few the pixels dominate.
A held member (forced photometry, :func:`ztfpsf.catalog.forced_groups`) keeps its
position: its x, y rows of the normal equations are those of padding (zero gradient, unit
diagonal, no coupling), so its step there is 0 and its flux error is the one at the fixed
position, while the other members' positions are fitted.

The model-based noise (gain, read noise, the fitted model including the neighbours
subtracted from the window) is re-evaluated at the solution and the fit repeated once,
as :mod:`ztfpsf.psf.measure` does for one star. The compiled core is pure JAX; the
host-side helpers below it (grouping, packing, windows, rendering) are numpy.
"""

import dataclasses
import logging
import math
import sys
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .._jax import with_x64
from ..fitting import linalg
from ..fitting.batching import in_rounds, run_chunked, select_devices
from ..fitting.lm import lm_solve
from ..fitting.objective import _profile_and_jacobian, flatten, noise_weight, pixel_grid
from ..fitting.objective import normal_equations as _star_equations
from ..flags import Flag
from .brighter_fatter import log_flux

log = logging.getLogger(__name__)

__all__ = ["GroupModel", "GroupOptions", "SIZES", "friends_of_friends", "make_groups", "Groups", "measure_groups",
           "render_sources", "flux_scale", "window_size"]

#: Iteration caps (per solve) of the rounds before the last (:func:`ztfpsf.fitting.batching.in_rounds`):
#: on the real ZTF quadrant isolated sources need a median of 3 iterations, but a chunk of
#: 64 ran ~10, its slowest member's; the few capped groups are refitted with the full cap.
ROUND_CAPS = (4,)
#: Fewest groups of one size fitted in rounds (each cap is one more program to compile).
ROUND_MIN_GROUPS = 512
#: Padded group sizes (members); a group goes to the smallest that holds it and its extent.
SIZES = (1, 2, 4, 8, 16)
#: Extent a group of each size may span, in linking lengths (the window grows with it).
_SPAN = {1: 0.0, 2: 1.0, 4: 2.5, 8: 4.0, 16: 6.0}


# --------------------------------------------------------------------------------------
# the compiled core
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupModel:
    """``size`` sources with fixed PSF shapes plus one background, on a flattened window
    (hashable: part of the compiled program's key). ``profile``: a profile of
    :mod:`ztfpsf.models` or :class:`ztfpsf.psf.residual.Hybrid`."""

    profile: object
    size: int
    prior_sigma: float = 1.0

    @property
    def n_shape(self):
        return self.profile.n_shape

    @property
    def n_free(self):
        return 3 * self.size + 1

    @property
    def n_params(self):
        return 7 * self.size + 1 + self.size * self.n_shape

    def unpack(self, theta):
        """``flux, x, y (G, K)``, ``background (G,)``, prior centres ``x0, y0 (G, K)``,
        ``valid (G, K)`` and the shape blocks ``(G * K, n_shape)``."""
        K = self.size
        f, x, y = theta[:, 0:3 * K:3], theta[:, 1:3 * K:3], theta[:, 2:3 * K:3]
        b = theta[:, 3 * K]
        x0, y0 = theta[:, 3 * K + 1:5 * K + 1:2], theta[:, 3 * K + 2:5 * K + 1:2]
        valid = theta[:, 5 * K + 1:6 * K + 1]
        blocks = theta[:, 7 * K + 1:].reshape(-1, self.n_shape)
        return f, x, y, b, x0, y0, valid, blocks

    def moving(self, theta):
        """``(G, K)``: 1 for a real member whose position is fitted, 0 for padding and held members."""
        K = self.size
        return theta[:, 5 * K + 1:6 * K + 1] * (1.0 - theta[:, 6 * K + 1:7 * K + 1])

    def profiles(self, theta, xx, yy, derivatives=True):
        """Unit profiles of every member on the window ``(G, K, pixels)`` (zero for padding)
        and, with ``derivatives``, their derivatives with respect to the member's x and y."""
        f, x, y, b, _, _, valid, blocks = self.unpack(theta)
        G, K = f.shape
        one = jnp.ones((G * K, 1), theta.dtype)
        stars = jnp.concatenate([one, x.reshape(-1, 1), y.reshape(-1, 1), blocks, 0.0 * one], axis=1)
        P, dP = _profile_and_jacobian(self.profile, stars, (1, 2) if derivatives else (), xx, yy)
        m = valid.reshape(G * K, 1)
        out = [jnp.where(m > 0, v, 0.0).reshape(G, K, -1) for v in [P] + dP]
        return out if derivatives else out[0]

    def sources(self, theta, xx, yy):
        """The members' light on the window ``(G, pixels)``, background excluded."""
        P = self.profiles(theta, xx, yy, derivatives=False)
        return jnp.einsum("gk,gkp->gp", theta[:, 0:3 * self.size:3], P)

    def normal_equations(self, free, theta, data, weight, xx, yy):
        """chi2, ``A = J^T W J`` (dict, lower triangle) and ``g = J^T W r`` over the
        ``3K + 1`` free parameters, with the position prior; padded members get a unit
        diagonal (their step is 0)."""
        K, n = self.size, self.n_free
        f, x, y, b, x0, y0, valid, blocks = self.unpack(theta)
        if K == 1:  # one source: the one-star equations (fused reductions, unrolled solve)
            return self._single(theta, data, weight, xx, yy)
        P, dPx, dPy = self.profiles(theta, xx, yy)
        moving = self.moving(theta)
        r = data - jnp.einsum("gk,gkp->gp", f, P) - b[:, None]
        fm = (f * moving)[..., None]  # held members: no position columns
        J = jnp.stack([P, fm * dPx, fm * dPy], axis=2).reshape(P.shape[0], 3 * K, -1)
        J = jnp.concatenate([J, jnp.ones_like(J[:, :1])], axis=1)
        WJ = J * weight[:, None, :]
        A = jnp.einsum("gip,gjp->gij", WJ, J)
        g = jnp.einsum("gip,gp->gi", WJ, r)
        chi2 = jnp.sum(weight * r * r, axis=1)
        # the position prior, and a unit diagonal for the padding and the held positions
        pw = moving / self.prior_sigma**2
        dx, dy = x0 - x, y0 - y
        prior_diag = jnp.stack([jnp.zeros_like(pw), pw, pw], axis=2).reshape(-1, 3 * K)
        pad_diag = jnp.stack([1.0 - valid, 1.0 - moving, 1.0 - moving], axis=2).reshape(-1, 3 * K)
        diag = jnp.concatenate([prior_diag + pad_diag, jnp.zeros_like(b[:, None])], axis=1)
        A = A + diag[:, :, None] * jnp.eye(n, dtype=A.dtype)
        g = g + jnp.concatenate([jnp.stack([jnp.zeros_like(dx), pw * dx, pw * dy], axis=2).reshape(-1, 3 * K),
                                 jnp.zeros_like(b[:, None])], axis=1)
        chi2 = chi2 + jnp.sum(pw * (dx * dx + dy * dy), axis=1)
        return chi2, A, [g[:, i] for i in range(n)]

    def _single(self, theta, data, weight, xx, yy):
        """A group of one: :func:`ztfpsf.fitting.objective.normal_equations` of the star
        ``[flux, x, y, shape, background]`` plus the position prior."""
        f, x, y, b, x0, y0, valid, blocks = self.unpack(theta)
        star = jnp.concatenate([f, x, y, blocks, b[:, None]], axis=1)
        chi2, A, g = _star_equations(self.profile, (0, 1, 2, star.shape[1] - 1), star, data, weight, xx, yy)
        m = self.moving(theta)[:, 0]
        pw = m / self.prior_sigma**2
        dx, dy = x0[:, 0] - x[:, 0], y0[:, 0] - y[:, 0]
        # a held position: its rows and columns those of padding (zero, unit diagonal)
        A = {(i, j): a * m if (i in (1, 2) or j in (1, 2)) else a for (i, j), a in A.items()}
        A[1, 1], A[2, 2] = A[1, 1] + pw + (1.0 - m), A[2, 2] + pw + (1.0 - m)
        g = [g[0], m * g[1] + pw * dx, m * g[2] + pw * dy, g[3]]
        return chi2 + pw * (dx * dx + dy * dy), A, g


@dataclass(frozen=True)
class GroupOptions:
    """Static options of the group fit (hashable: part of the compiled program's key)."""

    noise: str = "model"  # 'model': gain/read noise per group; 'given': variance
    fit_radius: float = 6.0  # px: a member's own pixels (its chi2 and dof)
    max_iter: int = 12  # per solve: a group still going by then is a blend the model lacks (flagged)
    tol: float = 1e-3
    history: bool = False  # read by fitting.lm


def _diagonal(cov, n):
    return jnp.diagonal(cov, axis1=-2, axis2=-1) if not isinstance(cov, dict) else jnp.stack([cov[i, i] for i in range(n)], 1)


def _fit_chunk(gm, opts, data, valid, scene, variance, per, theta0, active):
    """Fit a chunk of groups of one size: the compiled program. ``per`` (groups, 5): gain,
    read noise, sky, 1 where the neighbours are subtracted (``scene`` less the group's own
    start model; ``scene`` is the light of all sources) and the number of solves (the
    noise model re-evaluated at the solution before each after the first)."""
    W = data.shape[1]
    xx, yy = pixel_grid(W, W, data.dtype)
    data, valid, scene = flatten(data), flatten(valid), flatten(scene)
    others = scene - per[:, 3, None] * gm.sources(theta0, xx, yy)
    target = jnp.where(valid, data - others, 0.0)
    free = tuple(range(gm.n_free))
    active = active & (jnp.sum(valid, axis=1) > gm.n_free)

    def weights(light, theta):
        if opts.noise == "given":
            var = flatten(jnp.broadcast_to(variance, (variance.shape[0], W, W)))
            return jnp.where(valid, 1.0 / jnp.where(valid & (var > 0), var, 1.0), 0.0)
        light = light + theta[:, gm.n_free - 1, None] + others
        return noise_weight(light, valid, per[:, 0], per[:, 1], per[:, 2])

    def solve(k, carry):  # the noise from the start, then (model noise) from the last solution
        theta, _, n_iter, _, settled = carry
        w = weights(gm.sources(theta, xx, yy), theta)
        theta, _, A, _, n, conv, _ = lm_solve(gm, free, opts, theta, target, w, active, xx, yy)
        return theta, A, n_iter + n, conv, settled & (conv | (n < opts.max_iter))

    A0 = jax.eval_shape(lambda t: gm.normal_equations(free, t, target, target, xx, yy)[1], theta0)
    n = theta0.shape[0]
    start = (theta0, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), A0), jnp.zeros(n, jnp.int32), jnp.zeros(n, bool),
             jnp.ones(n, bool))
    rounds = jnp.max(per[:, 4]).astype(jnp.int32) if opts.noise == "model" else 1
    theta, A, n_iter, conv, settled = jax.lax.fori_loop(0, rounds, solve, start)
    cov, ok = linalg.inverse(A, gm.n_free)
    var = _diagonal(cov, gm.n_free)
    # each member's own pixels: its chi2 and how many there are
    f, x, y, b, _, _, m, _ = gm.unpack(theta)
    light = gm.sources(theta, xx, yy)
    r = target - light - b[:, None]
    w = weights(light, theta)
    disc = ((xx - x[..., None]) ** 2 + (yy - y[..., None]) ** 2 <= opts.fit_radius**2) & valid[:, None, :] & (m[..., None] > 0)
    chi2 = jnp.sum(jnp.where(disc, (w * r * r)[:, None, :], 0.0), axis=2)
    return dict(theta=theta[:, :gm.n_free], var=var, chi2=chi2, n_pix=jnp.sum(disc, axis=2), n_iter=n_iter,
                converged=conv, ok=ok & active, capped=~settled & active)


# --------------------------------------------------------------------------------------
# host side: grouping
# --------------------------------------------------------------------------------------
def friends_of_friends(x, y, link):
    """Group label ``(N,)`` (0..n_groups-1) of each position: sources closer than ``link``
    [px] to any member of a group belong to it."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64)
    pairs = cKDTree(np.column_stack([x, y])).query_pairs(float(link), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _extent(x, y):
    return max(np.ptp(x), np.ptp(y)) if len(x) else 0.0


def _size_for(n, extent, link):
    """The smallest padded size that holds ``n`` members spanning ``extent`` px; None if none."""
    for K in SIZES:
        if K >= n and extent <= _SPAN[K] * link + 1e-9:
            return K
    return None


def _split(idx, x, y, link):
    """Index arrays of pieces of a group too large for :data:`SIZES`: friends of friends
    with a shorter linking length, down to halves of the group along its longer axis."""
    pieces, todo = [], [(idx, link)]
    while todo:
        members, ln = todo.pop()
        if _size_for(len(members), _extent(x[members], y[members]), link) is not None:
            pieces.append(members)
            continue
        shorter = 0.8 * ln
        labels = friends_of_friends(x[members], y[members], shorter) if shorter > 0.5 else np.zeros(len(members), int)
        if labels.max() == 0:  # still one group: cut it in two along its longer axis
            axis = x[members] if np.ptp(x[members]) >= np.ptp(y[members]) else y[members]
            order = np.argsort(axis, kind="stable")
            half = len(members) // 2
            todo += [(members[order[:half]], shorter), (members[order[half:]], shorter)]
        else:
            todo += [(members[labels == k], shorter) for k in range(labels.max() + 1)]
    return pieces


@dataclass
class Groups:
    """Sources grouped for a simultaneous fit.

    ``label (N,)``: group id of each source (-1: not fitted); ``size (N,)``: members of its
    group; ``members``: per padded size ``K``, an ``(G, K)`` array of source indices (-1
    for padding); ``split (N,)``: the source's friends-of-friends group was too large and
    was cut into pieces fitted one after the other; ``link`` [px].
    """

    label: np.ndarray
    size: np.ndarray
    members: dict
    split: np.ndarray
    link: float

    @property
    def n_groups(self):
        return sum(len(m) for m in self.members.values())


def _padded_rows(pieces, K):
    """``(G, K)`` rows of the index arrays ``pieces``, padded with -1."""
    out = np.full((len(pieces), K), -1, np.int64)
    for r, piece in enumerate(pieces):
        out[r, :len(piece)] = piece
    return out


def make_groups(x, y, link, use=None):
    """Group the sources at ``(x, y)`` (those with ``use``) by friends of friends with
    linking length ``link`` [px]; groups that fit no padded size are split. Vectorised
    over the groups (a quadrant has thousands); only the groups to split loop."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    use = np.ones(n, bool) if use is None else np.asarray(use, bool)
    idx = np.flatnonzero(use)
    label = np.full(n, -1, np.int64)
    size = np.zeros(n, np.int32)
    split = np.zeros(n, bool)
    members = {}
    if not len(idx):
        return Groups(label, size, members, split, float(link))
    fof = friends_of_friends(x[idx], y[idx], link)
    order = np.argsort(fof, kind="stable")
    src = idx[order]  # sources sorted by group
    start = np.concatenate([[0], np.flatnonzero(np.diff(fof[order])) + 1])
    count = np.diff(np.concatenate([start, [len(src)]]))
    span = lambda v: np.maximum.reduceat(v[src], start) - np.minimum.reduceat(v[src], start)
    extent = np.maximum(span(x), span(y))
    fits = np.full(len(start), -1)
    for K in reversed(SIZES):  # the smallest size that holds each group
        fits = np.where((count <= K) & (extent <= _SPAN[K] * link + 1e-9), K, fits)
    pos = np.arange(len(src)) - np.repeat(start, count)  # position within the group
    gid = 0
    for K in SIZES:
        sel = np.flatnonzero(fits == K)
        rows = np.full((len(sel), K), -1, np.int64)
        rep = np.repeat(np.arange(len(sel)), count[sel])
        take = np.flatnonzero(np.repeat(fits == K, count))  # sorted positions of those groups' members
        rows[rep, pos[take]] = src[take]
        members[K] = rows
        label[src[take]] = gid + rep
        size[src[take]] = count[sel][rep]
        gid += len(sel)
    pieces = {K: [] for K in SIZES}
    for g in np.flatnonzero(fits < 0):
        group = src[start[g]:start[g] + count[g]]
        split[group] = True
        for piece in _split(group, x, y, link):
            pieces[_size_for(len(piece), _extent(x[piece], y[piece]), link)].append(piece)
            label[piece], size[piece] = gid, len(piece)
            gid += 1
    for K, v in pieces.items():
        if v:
            members[K] = np.concatenate([members[K], _padded_rows(v, K)])
    members = {K: m for K, m in members.items() if len(m)}
    if split.any():
        log.info("%d sources in groups too large for %d members were fitted in pieces", int(split.sum()), SIZES[-1])
    return Groups(label, size, members, split, float(link))


def window_size(K, link, fit_radius):
    """Side [px] of the square window of a group of padded size ``K``: its members' fit
    discs anywhere within the extent ``_SPAN[K] * link``, plus a pixel of rounding."""
    pad = 2 * math.ceil(_SPAN[K] * link / 2.0)
    return 2 * math.ceil(fit_radius) + 3 + pad


# --------------------------------------------------------------------------------------
# host side: measuring the groups of an image
# --------------------------------------------------------------------------------------
def _chunk(K, W):
    """Groups per chunk: about 64 isolated 17x17 stars' worth of pixels (cache-sized, and
    few groups held up by a slow one: a chunk iterates until its last group is done)."""
    return int(np.clip(2 ** round(np.log2(64 * 289 / (K * W * W))), 4, 64))


def fit_profile(psf, x, y):
    """The profile the group programs are compiled with: the PSF's own, except that an
    ``"adaptive"`` integration that splits no pixel for any of the sources at ``(x, y)``
    (the PSF is wide enough everywhere) is compiled as its one-box expansion, which it then
    is exactly: the same values at a fraction of the compile time."""
    from ..models import _ADAPTIVE_ORDER, get_model
    from .residual import Hybrid

    core = psf.model
    if core.integration != "adaptive" or not len(x):
        return psf.profile_model
    u = psf.internal(x, y, extrapolate=True)
    u = tuple(jnp.asarray(u[:, k]) for k in range(core.n_shape))
    a, b, c, _ = core.quad_form(u)
    if int(jnp.max(core._split_level(u, a, b, c))) > 0:
        return psf.profile_model
    box = get_model(core.name, f"taylor{_ADAPTIVE_ORDER}")
    return Hybrid(box, psf.grid) if psf.hybrid is not None else box


def _disc_flags(stamps, ox, oy, fit_radius, members):
    """Per member ``(G, K)``: MASKED_PIXELS, SATURATED and OFF_IMAGE bits of its own disc."""
    W = stamps.size
    yy, xx = np.mgrid[0:W, 0:W]
    disc = (xx[None, None] - ox[..., None, None]) ** 2 + (yy[None, None] - oy[..., None, None]) ** 2 <= fit_radius**2
    off = ~np.isfinite(stamps.data)
    any_in = lambda bad: np.any(disc & bad[:, None], axis=(2, 3))
    flags = np.where(any_in(stamps.mask & ~off), int(Flag.MASKED_PIXELS), 0)
    flags |= np.where(any_in(stamps.saturated), int(Flag.SATURATED), 0)
    flags |= np.where(any_in(off), int(Flag.OFF_IMAGE) | int(Flag.MASKED_PIXELS), 0)
    return np.where(members >= 0, flags, 0)


def _valid_pixels(stamps, ox, oy, members, fit_radius):
    """Usable window pixels: finite, not masked or saturated, within ``fit_radius`` of a member."""
    W = stamps.size
    yy, xx = np.mgrid[0:W, 0:W]
    near = np.zeros(stamps.data.shape, bool)
    for k in range(members.shape[1]):
        d2 = (xx[None] - ox[:, k, None, None]) ** 2 + (yy[None] - oy[:, k, None, None]) ** 2
        near |= (d2 <= fit_radius**2) & (members[:, k, None, None] >= 0)
    return near & np.isfinite(stamps.data) & ~stamps.mask & ~stamps.saturated


def _noise(exposure, stamps, background, noise, n):
    """``(mode, per-group (gain, read_noise, sky), variance or None)`` from
    :func:`ztfpsf.stamps.noise_model`; without a gain or a background map, the sky rms of
    each window's usable pixels (1.4826 MAD) as a constant variance."""
    from ..stamps import noise_model

    per = np.tile(np.array([1.0, 0.0, 0.0]), (n, 1))
    if exposure.gain is None and stamps.sky_rms is None:
        d = np.where(np.isfinite(stamps.data) & ~stamps.mask & ~stamps.saturated, stamps.data, np.nan)
        med = np.nanmedian(d, axis=(1, 2), keepdims=True)
        sig = 1.4826 * np.nanmedian(np.abs(d - med), axis=(1, 2), keepdims=True)
        return "given", per, np.where(np.isfinite(sig) & (sig > 0), sig * sig, 1.0)
    kwargs, _ = noise_model(exposure, stamps, background, mode=noise)
    if "variance" in kwargs:
        return "given", per, kwargs["variance"]
    per[:, 0] = kwargs["gain"]
    per[:, 1] = kwargs.get("read_noise", 0.0)
    return "model", per, None


@with_x64
def measure_groups(psf, exposure, x, y, flux, groups, *, centre=None, held=None, background=None, scene=None, scale=None,
                   noise="measured", fit_radius=6.0, prior_sigma=1.0, rounds=2, dtype="float32", backend="auto",
                   progress=False):
    """Fit every group of ``groups`` (:func:`make_groups`) on ``exposure`` with ``psf`` (a
    :class:`~ztfpsf.psf.PSFModel`) fixed at each source's position.

    ``x, y (N,)``: start positions; ``centre``: ``(x, y)`` of the position prior (default
    the start); ``held (N,)`` bool: sources whose position stays at the start (forced
    photometry; their ``x_err, y_err`` are 0); ``flux (N,)``: start
    fluxes on the PSF's flux scale. ``scene`` (an image like ``exposure.data``, the light
    of all sources from an earlier pass, :func:`render_sources`): each group's window is
    fitted with the scene less the group's own start model subtracted (the neighbours
    outside the group), which also enters the noise model. ``background``: a
    :class:`ztfpsf.detect.Background` (the sky noise of the windows and the start
    background). ``noise``: mode of :func:`ztfpsf.stamps.noise_model`; ``rounds``: solves,
    the model-based noise re-evaluated at the solution before each after the first.

    Returns a dict of ``(N,)`` columns in image coordinates: ``x, x_err, y, y_err, flux,
    flux_err`` (on the PSF's flux scale), ``background, background_err`` (the group's),
    ``chi2, dof`` (over the source's own disc of ``fit_radius`` px), ``n_iter``,
    ``flags`` (BAD rows NaN); rows of sources in no group are NaN with flags 0.
    """
    from tqdm.auto import tqdm

    from ..stamps import cut, cut_stamps

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    px, py = (x, y) if centre is None else (np.asarray(centre[0], np.float64), np.asarray(centre[1], np.float64))
    n = len(x)
    held = np.zeros(n, bool) if held is None else np.asarray(held, bool)
    dtype = np.dtype(dtype)
    devices = select_devices(backend)
    names = ("x", "x_err", "y", "y_err", "flux", "flux_err", "background", "background_err", "chi2")
    cols = {k: np.full(n, np.nan) for k in names}
    dof, n_iter, flags = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int64)
    fitted = groups.label >= 0
    if scale is None:
        scale = np.ones(n)
        scale[fitted] = flux_scale(psf, x[fitted], y[fitted], flux=flux[fitted])
    model = fit_profile(psf, x[fitted], y[fitted])
    bar = tqdm(total=groups.n_groups, desc="groups", unit="group", disable=not (progress and sys.stderr.isatty()), leave=False)
    for K, members in groups.members.items():
        gm = GroupModel(model, K, float(prior_sigma))
        W = window_size(K, groups.link, fit_radius)
        real = members >= 0
        mi = np.where(real, members, members[:, :1])  # padding repeats the first member (masked)
        cx = 0.5 * (np.where(real, x[mi], np.inf).min(1) + np.where(real, x[mi], -np.inf).max(1))
        cy = 0.5 * (np.where(real, y[mi], np.inf).min(1) + np.where(real, y[mi], -np.inf).max(1))
        stamps = cut_stamps(exposure, cx, cy, W, background=background)
        ox, oy = x[mi] - stamps.origin[:, :1], y[mi] - stamps.origin[:, 1:]
        valid = _valid_pixels(stamps, ox, oy, members, fit_radius)
        disc_flags = _disc_flags(stamps, ox, oy, fit_radius, members)
        mode, per, variance = _noise(exposure, stamps, background, noise, len(members))
        x0i, y0i = stamps.origin[:, 0].astype(np.int64), stamps.origin[:, 1].astype(np.int64)
        sc = np.zeros((len(members), W, W)) if scene is None else cut(scene, x0i, y0i, W, 0.0)
        if stamps.sky is not None:
            b0 = np.nan_to_num(stamps.sky)
        else:
            with np.errstate(all="ignore"):
                b0 = np.nan_to_num(np.nanmedian(np.where(valid, stamps.data, np.nan), axis=(1, 2)))
        f0 = np.where(real, np.nan_to_num(flux[mi]) / scale[mi], 0.0)
        blocks = psf.shape_block(x[mi].ravel(), y[mi].ravel(), flux=law_flux(psf, flux[mi].ravel())).reshape(len(members), -1)
        local = np.stack([f0, ox, oy], axis=2).reshape(len(members), -1)
        prior = np.stack([px[mi] - stamps.origin[:, :1], py[mi] - stamps.origin[:, 1:]], axis=2).reshape(len(members), -1)
        theta0 = np.concatenate([local, b0[:, None], prior, real.astype(np.float64),
                                 (real & held[mi]).astype(np.float64), blocks], axis=1)
        opts = GroupOptions(noise=mode, fit_radius=float(fit_radius))
        per = np.column_stack([per, np.full(len(members), 0.0 if scene is None else 1.0), np.full(len(members), rounds)])
        var_in = np.ones((len(members), 1, 1)) if variance is None else np.broadcast_to(variance, (len(members), W, W))
        arrays = (np.where(valid, stamps.data, 0.0).astype(dtype), valid, sc.astype(dtype), var_in.astype(dtype),
                  per.astype(dtype), theta0.astype(dtype), np.ones(len(members), bool))
        fit = lambda idx, cap: run_chunked((_fit_chunk, gm, dataclasses.replace(opts, max_iter=cap)),
                                           tuple(a[idx] for a in arrays), devices, _chunk(K, W))
        caps = tuple(c for c in ROUND_CAPS if c < opts.max_iter and len(members) >= ROUND_MIN_GROUPS) + (opts.max_iter,)
        out = in_rounds(fit, len(members), caps)
        _scatter(cols, dof, n_iter, flags, out, members, stamps.origin, scale, disc_flags, held)
        bar.update(len(members))
    bar.close()
    bad = (flags & int(Flag.FIT_FAILED | Flag.NO_DATA)) != 0
    fixed = held & (groups.label >= 0)  # the start exactly (not its float32 copy), no error
    cols["x"][fixed], cols["y"][fixed] = x[fixed], y[fixed]
    cols["x_err"][fixed], cols["y_err"][fixed] = 0.0, 0.0
    for k in names:
        cols[k][bad] = np.nan
    return dict(cols, dof=dof, n_iter=n_iter, flags=flags)


def _scatter(cols, dof, n_iter, flags, out, members, origin, scale, disc_flags, held):
    """Write one size's results into the per-source columns (``dof``: the disc's pixels
    less flux, x, y, or less the flux alone for a ``held`` position)."""
    K = members.shape[1]
    real = members >= 0
    idx = members[real]
    th, sd = out["theta"].astype(np.float64), np.sqrt(np.maximum(out["var"].astype(np.float64), 0.0))
    pick = lambda a, k: a[:, k:3 * K:3][real]
    rep = lambda v: np.repeat(v[:, None], K, axis=1)[real]
    s = scale[idx]
    cols["flux"][idx], cols["flux_err"][idx] = pick(th, 0) * s, pick(sd, 0) * s
    cols["x"][idx], cols["x_err"][idx] = pick(th, 1) + rep(origin[:, 0]), pick(sd, 1)
    cols["y"][idx], cols["y_err"][idx] = pick(th, 2) + rep(origin[:, 1]), pick(sd, 2)
    cols["background"][idx], cols["background_err"][idx] = rep(th[:, 3 * K]), rep(sd[:, 3 * K])
    cols["chi2"][idx] = out["chi2"].astype(np.float64)[real]
    n_pix = out["n_pix"][real]
    dof[idx] = np.maximum(n_pix - np.where(held[idx], 1, 3), 0)
    n_iter[idx] = rep(out["n_iter"])
    finite = np.isfinite(th).all(axis=1) & np.isfinite(sd).all(axis=1)
    f = disc_flags[real].astype(np.int64)
    f |= np.where(n_pix <= 3, int(Flag.NO_DATA), 0)
    f |= np.where(rep(~(out["ok"] & finite)), int(Flag.FIT_FAILED), 0)
    f |= np.where(rep(~out["converged"]), int(Flag.NOT_CONVERGED), 0)
    flags[idx] |= f


# --------------------------------------------------------------------------------------
# host side: the light of all sources as an image
# --------------------------------------------------------------------------------------
#: Render sizes [px] of :func:`render_sources`, by how far a source's light reaches.
RENDER_SIZES = (17, 33, 65, 129)
_RENDER_BATCH = 1024  # sources rendered per call (the last call padded to a power of two)


def flux_scale(psf, x, y, n=9, flux=None):
    """:meth:`~ztfpsf.psf.PSFModel.enclosed` at each position (the flux within the PSF's
    ``flux_radius`` of a unit-total-flux source): one evaluation for a PSF with one shape,
    else cubic interpolation from an ``n x n`` grid over its bounds (the fraction varies
    smoothly; a disc integral per source would cost more than the fit). ``flux`` (on the
    PSF's scale): the sources' own for a residual surface with a flux term, whose disc
    integral is linear in ``log10 flux`` (a size law is left at its reference)."""
    from scipy.interpolate import RegularGridInterpolator

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xmin, xmax, ymin, ymax = psf.bounds
    xc, yc = 0.5 * (xmin + xmax), 0.5 * (ymin + ymax)
    if psf.degree == 0 or len(x) <= n * n:
        values = np.full(x.shape, float(psf.enclosed(xc, yc))) if psf.degree == 0 else psf.enclosed(x, y)
    else:
        gx, gy = np.linspace(xmin, xmax, n), np.linspace(ymin, ymax, n)
        grid = psf.enclosed(*np.meshgrid(gx, gy))
        interp = RegularGridInterpolator((gy, gx), grid, method="cubic", bounds_error=False, fill_value=None)
        values = interp(np.column_stack([np.clip(y, ymin, ymax), np.clip(x, xmin, xmax)]))
    if flux is None or not psf.residual_flux:
        return values
    top = 10 ** psf.bf_range[1] if psf.bf_range else 10 * psf.bf_ref
    per_dex = (float(psf.enclosed(xc, yc, flux=top)) - float(psf.enclosed(xc, yc))) / float(log_flux(top, psf.bf_ref, psf.bf_range))
    return values + per_dex * log_flux(np.asarray(flux, np.float64), psf.bf_ref, psf.bf_range)


def law_flux(psf, flux):
    """The fluxes that set a flux-dependent PSF's shape (None for a PSF without one)."""
    return np.asarray(flux, np.float64) if psf.flux_dependent else None


def _render_size(psf, total, x, y, limit, smallest):
    """Per source the smallest of :data:`RENDER_SIZES` (at least ``smallest``) whose edge
    lies where ``total`` (flux) times the PSF's profile is below ``limit`` [ADU]."""
    from .model import _stamp_fn

    sizes = np.array([s for s in RENDER_SIZES if s >= smallest] or [RENDER_SIZES[-1]])
    big = int(sizes[-1])
    c = big // 2
    cx, cy = float(np.median(x)), float(np.median(y))
    block = psf.shape_block(np.array([cx]), np.array([cy]))
    ref = np.asarray(_stamp_fn(psf.profile_model, big, big)(np.array([float(c)]), np.array([float(c)]), block))[0]
    yy, xx = np.mgrid[0:big, 0:big]
    r = np.hypot(xx - c, yy - c)
    # the brightest pixel of the profile outside each half-size
    outside = np.array([np.max(np.where(r > (s - 1) / 2 - 1, np.abs(ref), 0.0)) for s in sizes[:-1]] + [0.0])
    k = np.argmax(np.abs(total)[:, None] * outside[None, :] < limit, axis=1)
    return sizes[k]


@with_x64
def render_sources(psf, shape, x, y, flux, *, scale=None, limit=0.05, smallest=RENDER_SIZES[0], dtype="float32"):
    """Image ``shape`` of the light of sources at ``(x, y)`` with ``flux`` on the PSF's flux
    scale (``scale``: :func:`flux_scale` at the sources, computed if not given), each on a
    stamp large enough that its light beyond is below ``limit`` [ADU/px]
    (:data:`RENDER_SIZES`); non-finite rows are skipped."""
    from ..stamps import stamp_origin
    from .model import _padded, _stamp_fn

    ny, nx = shape
    x, y, flux = (np.asarray(v, np.float64) for v in (x, y, flux))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(flux) & (flux != 0)
    image = np.zeros(ny * nx)
    if not ok.any():
        return image.reshape(ny, nx)
    scale = flux_scale(psf, x[ok], y[ok], flux=flux[ok]) if scale is None else np.asarray(scale, np.float64)[ok]
    x, y, flux = x[ok], y[ok], flux[ok]
    total = flux / scale
    sizes = _render_size(psf, total, x, y, limit, smallest)
    dt = np.dtype(dtype)
    where, light = [], []  # flat pixel indices and values of every stamp: one sum at the end
    for s in np.unique(sizes):
        for start in range(0, int(np.sum(sizes == s)), _RENDER_BATCH):
            idx = np.flatnonzero(sizes == s)[start:start + _RENDER_BATCH]
            x0, y0 = stamp_origin(x[idx], y[idx], s)
            block = psf.shape_block(x[idx], y[idx], flux=law_flux(psf, flux[idx])).astype(dt)
            img = _padded(_stamp_fn(psf.profile_model, int(s), int(s)), (x[idx] - x0).astype(dt), (y[idx] - y0).astype(dt), block)
            img = img * total[idx, None, None]
            rows = y0.astype(np.int64)[:, None, None] + np.arange(s)[None, :, None]
            cols = x0.astype(np.int64)[:, None, None] + np.arange(s)[None, None, :]
            inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx) & np.isfinite(img)
            where.append(np.broadcast_to(rows * nx + cols, img.shape)[inside])
            light.append(img[inside])
    image += np.bincount(np.concatenate(where), weights=np.concatenate(light), minlength=ny * nx)
    return image.reshape(ny, nx)
