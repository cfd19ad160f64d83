"""The one registry of ``flags`` bits used in every ztfpsf table.

A row's ``flags`` is the bitwise OR of the bits below. Bits in :data:`BAD` mean the
row's fitted values are NaN (the star could not be measured); the other bits are
warnings and the values are kept.
"""

from enum import IntFlag

import numpy as np

__all__ = ["Flag", "BAD", "decode", "describe_table"]


class Flag(IntFlag):
    """Flag bits; the docstring of each member is its documented meaning."""

    NOT_CONVERGED = 1
    FIT_FAILED = 2
    NO_DATA = 4
    NO_SOURCE = 8
    MASKED_PIXELS = 16
    SATURATED = 32
    SHAPE_LIMIT = 64
    CENTER_SHIFT = 128
    OUTLIER = 256
    RESERVED = 512
    OFF_IMAGE = 1024
    SHAPE_UNTRUSTED = 2048
    POOR_FIT = 4096
    OUTSIDE_PSF = 8192
    BLENDED = 16384
    EXTRAPOLATED = 32768
    NEIGHBOUR = 65536
    NOT_POSITIVE = 131072


_MEANINGS = {
    Flag.NOT_CONVERGED: "iteration cap reached before the convergence test passed",
    Flag.FIT_FAILED: "non-finite chi2 or parameters, or a singular normal matrix; values are NaN",
    Flag.NO_DATA: "fewer usable pixels than free parameters (all NaN/masked/saturated); values are NaN",
    Flag.NO_SOURCE: "no significant source: flux over its error at the fitted shape below min_snr (3); values are NaN",
    Flag.MASKED_PIXELS: "some stamp pixels were masked or NaN and got zero weight",
    Flag.SATURATED: "some stamp pixels were at or above the saturation level and got zero weight",
    Flag.SHAPE_LIMIT: "fitted shape at a limit: alpha outside [1.1, 20], fwhm above the stamp size, or the minor-axis "
    "fwhm below where the pixel integration holds (adaptive_min_fwhm(alpha): 0.4-0.55 px)",
    Flag.CENTER_SHIFT: "fitted centre moved more than max_shift px from the initial position",
    Flag.OUTLIER: "left out of the joint PSF fit: chi2/dof far above stars of similar flux (binary, cosmic ray, neighbour) or unusable normal equations; measured with the final PSF fixed",
    Flag.RESERVED: "reserve star: left out of the joint PSF fit and scored with the final PSF",
    Flag.OFF_IMAGE: "position off the image, or its stamp not fully inside the image",
    Flag.SHAPE_UNTRUSTED: "the PSF shape used for this measurement could not be trusted",
    Flag.POOR_FIT: "chi2/dof far above what the PSF model allows (dipole, bad subtraction, blend); values kept",
    Flag.OUTSIDE_PSF: "position outside the PSF model's region of validity; values are NaN",
    Flag.EXTRAPOLATED: "position outside the convex hull of the stars that fitted the PSF: its spatial polynomial is extrapolated there; values kept",
    Flag.BLENDED: "another source's light shifts the flux by more than half its error (a catalogue neighbour, or a point source in the residual off the centre; in the PSF-fit catalogue and grouped forced photometry: another fitted source closer than the resolution limit, 1 FWHM); values kept",
    Flag.NEIGHBOUR: "PSF-fit catalogue and grouped forced photometry: another source inside the fit disc was not fitted together with this one (its group was too large and fitted in pieces): its light was subtracted as fitted; values kept",
    Flag.NOT_POSITIVE: "alerts: the forced flux on the difference image is <= 0 (a fading or absent source): no magnitude; values kept",
}

#: Bits whose rows carry NaN values (forced photometry's ``OFF_IMAGE`` rows are NaN too).
BAD = Flag.FIT_FAILED | Flag.NO_DATA | Flag.NO_SOURCE | Flag.OUTSIDE_PSF


def decode(value):
    """Names of the bits set in one ``flags`` value, e.g. ``['NOT_CONVERGED']``."""
    value = int(value)
    return [f.name for f in Flag if value & f]


def describe_table():
    """Markdown table of every bit: value, name, meaning (used in the README and reports)."""
    rows = ["| bit | value | name | meaning |", "|---|---|---|---|"]
    for f in Flag:
        rows.append(f"| {int(np.log2(f.value))} | {f.value} | `{f.name}` | {_MEANINGS[f]} |")
    return "\n".join(rows)


def meaning(flag):
    """Documented meaning of one bit."""
    return _MEANINGS[Flag(flag)]
