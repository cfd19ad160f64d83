"""Read a star catalogue into the table the selection works on.

Formats: CSV, ECSV, FITS table, Parquet, SExtractor ``ASCII_HEAD`` (``# 1 NUMBER ...``
header) and whatever else astropy's ``Table.read`` can guess (by file extension first).

Output columns (always, in this order, then every other column of the file unchanged):

``id``
    from ``id``/``source_id`` (Gaia)/``NUMBER`` (SExtractor)/...; generated as the row index
    (0, 1, ...) when absent.
``ra, dec`` [deg]
    from ``ra/dec``, ``RA/DEC``, ``RAJ2000/DEJ2000``, ``ALPHA_J2000/DELTA_J2000``,
    ``ra_icrs/de_icrs``...; computed from x/y with the WCS when the catalogue has only
    pixels; NaN when unknown.
``x, y`` [px, 0-based, pixel centres at integers]
    The catalogue's ``x/y`` (or ``xcentroid/ycentroid``, ``x_init/y_init``, ``xpos/ypos``)
    used directly when present; SExtractor/IRAF ``X_IMAGE/Y_IMAGE`` (or ``XWIN_IMAGE``...)
    are 1-based (FITS convention) and get 1 subtracted (``meta['pixel_origin']`` says so).
    Otherwise ``ra/dec`` projected with the image's celestial WCS (any frame: a Galactic
    WCS gets ICRS coordinates converted). ``prefer='sky'`` projects ra/dec even when x/y
    columns exist (a catalogue measured on another image).
``mag``
    from ``mag``, ``phot_g_mean_mag`` (Gaia G), ``gmag``, ``rmag``, ``MAG_AUTO``...; NaN
    when absent. ``meta['mag_kind']``: ``'calibrated'`` (catalogue magnitudes),
    ``'instrumental'`` (SExtractor ``MAG_*`` columns), or None (no magnitudes).
``snr``
    flux / flux error when the catalogue has such a pair (``FLUX_AUTO/FLUXERR_AUTO``,
    ``flux/flux_err``, ``phot_g_mean_flux/_error``), else NaN; the selection uses it
    when magnitudes are not calibrated.

Problems raise :class:`CatalogError` ``"<path>: <problem>"``: unreadable file, no position
columns (the message lists the columns found), ra/dec without a celestial WCS. A
catalogue none of whose sources falls on the image gives a :class:`FootprintWarning`
(the caller decides what to do with an empty selection).
"""

import logging
import warnings
from pathlib import Path

import numpy as np
from astropy.table import MaskedColumn, Table

log = logging.getLogger(__name__)

__all__ = ["read_catalog", "CatalogError", "FootprintWarning", "ALIASES", "sky_to_pixel", "pixel_to_sky", "on_image"]


class CatalogError(ValueError):
    """A catalogue that cannot be used; the message starts with the file path."""


class FootprintWarning(UserWarning):
    """No catalogue source falls on the image."""


#: Accepted names (case-insensitive) for each canonical column, in order of preference.
ALIASES = {
    "id": ("id", "source_id", "number", "objid", "object_id", "sourceid", "name"),
    "ra": ("ra", "ra_deg", "raj2000", "ra_icrs", "alpha_j2000", "alphawin_j2000", "ra_j2000"),
    "dec": ("dec", "dec_deg", "dej2000", "decj2000", "de_icrs", "dec_icrs", "delta_j2000", "deltawin_j2000", "dec_j2000"),
    "x": ("x", "xcentroid", "x_centroid", "x_init", "x_0", "xpos", "x_image", "xwin_image", "x_world_pix"),
    "y": ("y", "ycentroid", "y_centroid", "y_init", "y_0", "ypos", "y_image", "ywin_image", "y_world_pix"),
    "mag": ("mag", "phot_g_mean_mag", "gmag", "g_mag", "rmag", "r_mag", "imag", "i_mag", "magnitude", "mag_psf", "mag_auto", "mag_best"),
}
# (flux, flux error) pairs giving the S/N
_SNR_PAIRS = (
    ("flux", "flux_err"),
    ("flux_auto", "fluxerr_auto"),
    ("flux_psf", "fluxerr_psf"),
    ("flux_best", "fluxerr_best"),
    ("phot_g_mean_flux", "phot_g_mean_flux_error"),
)
# 1-based pixel conventions (SExtractor, IRAF): FITS pixel 1 is numpy pixel 0
_ONE_BASED = {"x_image", "y_image", "xwin_image", "ywin_image", "xpeak_image", "ypeak_image"}
_INSTRUMENTAL_MAGS = {"mag_auto", "mag_best", "mag_psf", "mag_aper", "mag_iso"}
_FORMATS = {
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".fts": "fits",
    ".parquet": "parquet",
    ".pq": "parquet",
}


# --------------------------------------------------------------------------------------
# reading the file
# --------------------------------------------------------------------------------------
def _suffix(path):
    name = path.name.lower()
    for ext in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _is_sextractor(path):
    try:
        with open(path, "rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return head.lstrip().startswith(b"#") and b"#   1 " in head.replace(b"#  1 ", b"#   1 ")


def _read_table(path, format=None):
    if not path.exists():
        raise CatalogError(f"{path}: no such file")
    if not path.is_file():
        raise CatalogError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CatalogError(f"{path}: empty file (0 bytes)")
    fmt = format or _FORMATS.get(_suffix(path))
    if fmt is None and _is_sextractor(path):
        fmt = "ascii.sextractor"
    tried = []
    # a known extension decides the format; only unknown ones are guessed (a guess on a
    # corrupt Parquet file would "succeed" with nonsense columns)
    for attempt in [fmt] if fmt else [None]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if attempt == "fits":
                    return _read_fits_table(path)
                return Table.read(path, format=attempt) if attempt else Table.read(path, format="ascii", guess=True)
        except CatalogError:
            raise
        except Exception as err:
            tried.append(f"{attempt or 'ascii (guessed)'}: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}")
    raise CatalogError(f"{path}: cannot read it as a catalogue ({'; '.join(tried)})")


def _read_fits_table(path):
    """First FITS table HDU (FITS catalogues keep the table in an extension)."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            for hdu in hdul:
                if isinstance(hdu, (fits.BinTableHDU, fits.TableHDU)):
                    return Table.read(hdu)
    except OSError as err:
        raise CatalogError(f"{path}: not a readable FITS file ({err})") from None
    raise CatalogError(f"{path}: the FITS file holds no table HDU")


def _find(table, key, columns=None):
    """Column name in ``table`` for canonical ``key`` (explicit ``columns`` mapping first)."""
    if columns and key in columns:
        name = columns[key]
        if name not in table.colnames:
            raise KeyError(name)
        return name
    lower = {c.lower(): c for c in table.colnames}
    for alias in ALIASES[key]:
        if alias in lower:
            return lower[alias]
    return None


def _float(raw, name, path):
    """Column ``name`` of ``raw`` as float64 (masked values NaN), or CatalogError."""
    col = raw[name]
    if isinstance(col, MaskedColumn):
        col = col.astype(np.float64).filled(np.nan) if col.dtype.kind in "iufb" else col.filled("nan")
    arr = np.asarray(col)
    if arr.ndim > 1:  # a vector column (e.g. several apertures): first element
        arr = arr.reshape(len(arr), -1)[:, 0]
    try:
        return np.asarray(arr, dtype=np.float64)
    except (TypeError, ValueError):
        example = str(arr[0]) if len(arr) else ""
        raise CatalogError(f"{path}: column {name!r} is not numeric (e.g. {example!r}); degrees or pixels are needed") from None


# --------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------
def sky_to_pixel(ra, dec, wcs):
    """ICRS ra/dec [deg] -> 0-based pixels with a celestial WCS of any frame."""
    from astropy.coordinates import SkyCoord

    ok = np.isfinite(ra) & np.isfinite(dec)
    x = np.full(ra.shape, np.nan)
    y = np.full(ra.shape, np.nan)
    if ok.any():
        coords = SkyCoord(ra[ok], dec[ok], unit="deg", frame="icrs")
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore")
            px, py = wcs.world_to_pixel(coords)
        x[ok], y[ok] = px, py
    return x, y


def pixel_to_sky(x, y, wcs):
    """0-based pixels -> ICRS ra/dec [deg]."""
    ok = np.isfinite(x) & np.isfinite(y)
    ra = np.full(x.shape, np.nan)
    dec = np.full(x.shape, np.nan)
    if ok.any():
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore")
            coords = wcs.pixel_to_world(x[ok], y[ok]).icrs
        ra[ok], dec[ok] = coords.ra.deg, coords.dec.deg
    return ra, dec


def on_image(x, y, shape):
    """True where (x, y) falls on an image of ``shape`` (ny, nx): -0.5 <= x < nx - 0.5."""
    ny, nx = shape
    with np.errstate(invalid="ignore"):
        return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def read_catalog(path, *, wcs=None, image_shape=None, prefer="auto", pixel_origin=None, columns=None, format=None, wcs_note=None):
    """Read a catalogue and give every source 0-based image pixels.

    Parameters
    ----------
    path : str or Path
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the image (``Exposure.wcs``): projects ra/dec to pixels (or pixels
        to ra/dec when the catalogue has only pixels).
    image_shape : (ny, nx), optional
        For the footprint check: a :class:`FootprintWarning` if no source falls on it.
    prefer : {'auto', 'pixel', 'sky'}
        ``'auto'``: x/y columns when present, else ra/dec; ``'sky'``: ra/dec projected with
        the WCS even when x/y exist; ``'pixel'``: x/y only.
    pixel_origin : {None, 0, 1}
        Origin of the catalogue's x/y: None guesses (1 for SExtractor/IRAF ``*_IMAGE``
        names, else 0).
    columns : dict, optional
        Explicit column names, e.g. ``{'ra': 'RA_ICRS', 'mag': 'Gmag'}``.
    format : str, optional
        astropy format name to force (e.g. ``'ascii.sextractor'``).
    wcs_note : str, optional
        Why the image has no WCS (``Exposure.wcs_note``), repeated in the error message.

    Returns
    -------
    astropy.table.Table
        ``id, ra, dec, x, y, mag, snr`` then the file's other columns; ``meta``:
        ``catalog``, ``positions`` ('pixel' or 'sky'), ``pixel_origin``, ``mag_kind``,
        ``n_on_image`` (when ``image_shape`` is given).
    """
    path = Path(path)
    if prefer not in ("auto", "pixel", "sky"):
        raise ValueError(f"prefer must be 'auto', 'pixel' or 'sky'; got {prefer!r}")
    raw = _read_table(path, format)
    if len(raw.colnames) == 0:
        raise CatalogError(f"{path}: the catalogue has no columns")
    try:
        names = {key: _find(raw, key, columns) for key in ALIASES}
    except KeyError as err:
        found = ", ".join(raw.colnames)
        raise CatalogError(f"{path}: column {err.args[0]!r} given in columns= is not in the catalogue; found: {found}") from None
    has_pix = names["x"] is not None and names["y"] is not None
    has_sky = names["ra"] is not None and names["dec"] is not None
    found = ", ".join(raw.colnames)
    if not has_pix and not has_sky:
        raise CatalogError(
            f"{path}: no position columns: need (ra, dec) [deg] or (x, y) [0-based pixels] "
            f"(or SExtractor X_IMAGE, Y_IMAGE); found: {found}"
        )
    if prefer == "pixel" and not has_pix:
        raise CatalogError(f"{path}: prefer='pixel' but no x/y columns; found: {found}")
    if prefer == "sky" and not has_sky:
        raise CatalogError(f"{path}: prefer='sky' but no ra/dec columns; found: {found}")
    use_pixels = has_pix if prefer == "auto" else prefer == "pixel"
    if not use_pixels and wcs is None:
        why = f" ({wcs_note})" if wcs_note else ""
        raise CatalogError(
            f"{path}: the catalogue has sky positions ({names['ra']}, {names['dec']}) but the image "
            f"has no celestial WCS{why}: give a catalogue with x, y pixel columns"
        )

    n = len(raw)
    out = Table(meta={"catalog": str(path)})
    out["id"] = _ids(path, raw, names["id"], n)
    meta = out.meta
    if use_pixels:
        origin = _origin(names, pixel_origin)
        x = _float(raw, names["x"], path) - origin
        y = _float(raw, names["y"], path) - origin
        if has_sky:
            ra, dec = _float(raw, names["ra"], path), _float(raw, names["dec"], path)
        elif wcs is not None:
            ra, dec = pixel_to_sky(x, y, wcs)
        else:
            ra = dec = np.full(n, np.nan)
        meta["positions"] = "pixel"
        meta["pixel_origin"] = origin
        if origin:
            log.info("%s: %s/%s are 1-based (FITS/SExtractor): 1 subtracted", path.name, names["x"], names["y"])
    else:
        ra, dec = _float(raw, names["ra"], path), _float(raw, names["dec"], path)
        x, y = sky_to_pixel(ra, dec, wcs)
        meta["positions"] = "sky"
        meta["pixel_origin"] = 0
    out["ra"], out["dec"], out["x"], out["y"] = ra, dec, x, y
    out["mag"] = _float(raw, names["mag"], path) if names["mag"] else np.full(n, np.nan)
    meta["mag_kind"] = None if names["mag"] is None else ("instrumental" if names["mag"].lower() in _INSTRUMENTAL_MAGS else "calibrated")
    meta["mag_column"] = names["mag"]
    out["snr"] = _snr(raw, n, path)
    for unit_col, unit in (("ra", "deg"), ("dec", "deg"), ("x", "pix"), ("y", "pix"), ("mag", "mag")):
        out[unit_col].unit = unit
    used = {names[k] for k in ("id", "ra", "dec", "x", "y", "mag") if names[k]}
    for name in raw.colnames:
        if name not in used and name not in out.colnames:
            out[name] = raw[name]
    log.info(
        "%s: %d sources (positions from %s, magnitudes %s)",
        path.name, n, "x/y" if use_pixels else "ra/dec + WCS", names["mag"] or "absent",
    )  # fmt: skip
    if image_shape is not None:
        _check_footprint(path, out, image_shape)
    return out


def _ids(path, raw, name, n):
    if name is None:
        return np.arange(n, dtype=np.int64)
    col = raw[name]
    if isinstance(col, MaskedColumn) and np.any(col.mask):
        raise CatalogError(f"{path}: id column {name!r} has missing values")
    values = np.asarray(col)
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    return values.astype(str)


def _origin(names, pixel_origin):
    if pixel_origin is not None:
        if pixel_origin not in (0, 1):
            raise ValueError(f"pixel_origin must be 0, 1 or None; got {pixel_origin!r}")
        return int(pixel_origin)
    return 1 if names["x"].lower() in _ONE_BASED else 0


def _snr(raw, n, path):
    lower = {c.lower(): c for c in raw.colnames}
    for flux, err in _SNR_PAIRS:
        if flux in lower and err in lower:
            f, e = _float(raw, lower[flux], path), _float(raw, lower[err], path)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(e > 0, f / e, np.nan)
    return np.full(n, np.nan)


def _check_footprint(path, table, shape):
    inside = on_image(np.asarray(table["x"]), np.asarray(table["y"]), shape)
    table.meta["n_on_image"] = int(inside.sum())
    if len(table) and not inside.any():
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        finite = np.isfinite(x) & np.isfinite(y)
        where = (
            f"the sources span x {np.min(x[finite]):.0f}..{np.max(x[finite]):.0f}, "
            f"y {np.min(y[finite]):.0f}..{np.max(y[finite]):.0f}"
            if finite.any()
            else "no source projects onto the image plane"
        )
        msg = f"{path}: none of the {len(table)} sources falls on the {shape[1]}x{shape[0]} image ({where})"
        log.warning(msg)
        warnings.warn(msg, FootprintWarning, stacklevel=3)
