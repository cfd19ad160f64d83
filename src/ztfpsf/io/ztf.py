"""ZTF conventions: science-quadrant file names and the ``mskimg`` bit mask.

File names follow ``ztf_<filefracday>_<field>_<filter>_c<ccd>_o_q<qid>_<suffix>.fits``,
e.g. ``ztf_20200924431759_000655_zr_c13_o_q3_sciimg.fits``: ``filefracday`` is
YYYYMMDD plus the fraction of the day (6 digits), ``field`` a 6-digit field id,
``filter`` one of ``zg, zr, zi``, ``ccd`` 1-16, ``qid`` 1-4; the readout-channel id is
``rcid = 4 (ccd - 1) + qid - 1`` (0-63).

Mask bits (IPAC ``mskimg``, as named by ztfimg) are in :data:`MASK_BITS`; by default every
bit but the two source-detection bits (1 ``sexsources``, 11 ``psfsources``) marks a pixel
unusable (:data:`DEFAULT_BAD_BITS`).
"""

import re
from datetime import datetime, timedelta

import numpy as np

__all__ = [
    "MASK_BITS",
    "DEFAULT_BAD_BITS",
    "bad_bits_value",
    "parse_filename",
    "is_ztf_name",
    "mask_from_bits",
    "mskimg_name",
]

MASK_BITS = {
    "tracks": 0,
    "sexsources": 1,
    "lowresponsivity": 2,
    "highresponsivity": 3,
    "noisy": 4,
    "ghosts": 5,
    "spillage": 6,
    "spikes": 7,
    "saturated": 8,
    "dead": 9,
    "nan": 10,
    "psfsources": 11,
    "brightstarhalo": 12,
}

DEFAULT_BAD_BITS = tuple(name for name in MASK_BITS if name not in ("sexsources", "psfsources"))

_NAME = re.compile(
    r"^ztf_(?P<filefracday>\d{14})_(?P<field>\d{6})_(?P<filter>z[gri])_c(?P<ccd>\d{2})_(?P<imgtypecode>[a-z])"
    r"_q(?P<qid>[1-4])_(?P<suffix>[a-z]+)\.fits(?:\.[a-z]+)?$"
)


def bad_bits_value(names=DEFAULT_BAD_BITS):
    """Integer bit mask of the named bits (names from :data:`MASK_BITS`).

    ``names`` may also be an int (returned as is) or a comma-separated string."""
    if isinstance(names, (int, np.integer)):
        return int(names)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    value = 0
    for name in names:
        if name not in MASK_BITS:
            raise ValueError(f"unknown ZTF mask bit {name!r}; known: {', '.join(MASK_BITS)}")
        value |= 1 << MASK_BITS[name]
    return value


def is_ztf_name(name):
    """True if ``name`` (a file name or path) is a valid ZTF file name."""
    return parse_filename(name) is not None


def parse_filename(name):
    """Fields of a ZTF file name, or ``None`` if it is not one.

    Returns a dict with ``filefracday`` (str), ``date`` (ISO UT date-time of the
    exposure from the day fraction), ``field`` (int), ``filter`` ('zg', 'zr', 'zi'),
    ``ccd`` (1-16), ``qid`` (1-4), ``rcid`` (0-63), ``suffix`` ('sciimg', 'mskimg', ...).
    """
    m = _NAME.match(str(name).rsplit("/", 1)[-1])
    if m is None:
        return None
    ffd = m["filefracday"]
    try:
        day = datetime.strptime(ffd[:8], "%Y%m%d")
    except ValueError:  # not a calendar date (e.g. month 13)
        return None
    when = day + timedelta(days=int(ffd[8:]) / 1e6)
    ccd, qid = int(m["ccd"]), int(m["qid"])
    if not 1 <= ccd <= 16:
        return None
    return {
        "filefracday": ffd,
        "date": when.isoformat(timespec="seconds"),
        "field": int(m["field"]),
        "filter": m["filter"],
        "ccd": ccd,
        "qid": qid,
        "rcid": 4 * (ccd - 1) + qid - 1,
        "suffix": m["suffix"],
    }


def mask_from_bits(values, bad_bits=DEFAULT_BAD_BITS):
    """Boolean image, True where ``values`` (an ``mskimg``) has any of ``bad_bits`` set.

    ``bad_bits``: bit names (see :data:`MASK_BITS`), a comma-separated string or an int.
    Non-integer values (a float mask, NaN) are read as integers, NaN as 0."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        values = np.nan_to_num(values, nan=0.0).astype(np.int64)
    return (values.astype(np.int64) & bad_bits_value(bad_bits)) != 0


def mskimg_name(name):
    """File name of the ``mskimg`` that goes with a ZTF ``sciimg`` name (same extension),
    or None if ``name`` is not a ZTF sciimg."""
    base = str(name).rsplit("/", 1)[-1]
    info = parse_filename(base)
    if info is None or info["suffix"] != "sciimg":
        return None
    return base.replace("_sciimg.", "_mskimg.", 1)
