"""``fit_stamps`` in rounds of growing iteration caps.

The fit runs a chunk of stars until its slowest star is done, and alert fits have long
tails: forced fits need a median of 3 Levenberg-Marquardt iterations but 2 % need 40-150
(a flat chi2 along the position at low S/N); free-shape star fits need 5, 10 % reach 30
(alpha running to a Gaussian). In a batch of thousands every chunk holds such a star and
runs 30-50x the median. So every star is first fitted with a low cap, and only the stars
that reached it are fitted again, from the same start, with the next cap. A star stops
at convergence whatever its cap, so its result is the one a single fit with the final cap
would give; the stragglers only repeat their first few iterations. Batches of fewer than
:data:`MIN_STARS` are fitted once: each cap is one more program to compile, for little gain.
"""

import numpy as np

from ..fitting import fit_stamps
from ..fitting.batching import in_rounds
from ..flags import Flag

__all__ = ["fit_in_rounds", "CAPS", "MIN_STARS"]

#: Iteration caps of the rounds before the last (the caller's ``max_iter``).
CAPS = (8, 30)
#: Smallest batch fitted in rounds.
MIN_STARS = 1024
_PER_STAR = ("mask", "origin", "x_init", "y_init")


def _rows(value, idx, n):
    value = np.asarray(value) if not np.isscalar(value) else value
    return value[idx] if np.ndim(value) >= 1 and len(value) == n else value


def fit_in_rounds(data, variance, *, max_iter=30, fixed=None, **kwargs):
    """``fit_stamps(data, variance, max_iter=max_iter, fixed=fixed, **kwargs)`` fitted in
    rounds (:data:`CAPS`, then ``max_iter``: :func:`ztfpsf.fitting.batching.in_rounds`);
    returns its columns as a dict of arrays."""
    n = len(data)
    caps = [c for c in CAPS if c < max_iter and n >= MIN_STARS] + [max_iter]

    def fit(todo, cap):
        args = {k: (_rows(v, todo, n) if k in _PER_STAR else v) for k, v in kwargs.items()}
        fix = {k: _rows(v, todo, n) for k, v in fixed.items()} if fixed else None
        t = fit_stamps(data[todo], variance[todo], max_iter=cap, fixed=fix, **args)
        out = {c: np.asarray(t[c]) for c in t.colnames}
        out["capped"] = (out["n_iter"] >= cap) & ((out["flags"] & Flag.NOT_CONVERGED) != 0)
        return out

    out = in_rounds(fit, n, caps)
    del out["capped"]
    return out
