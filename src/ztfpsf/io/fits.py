"""Read one image (FITS) into an :class:`Exposure`: pixels, bad-pixel mask, WCS and the
header values the fit needs, with every problem reported as one line naming the file.

What is read
------------
* Pixels: the first HDU holding a 2-D image (or ``hdu=``), converted to native-endian
  float32 (integer or float32 files) or float64 (float64 files). Compressed (``.fz``) and
  gzipped (``.fits.gz``) files work.
* Mask (``Exposure.mask``, True = unusable): NaN/inf pixels, the bad bits of a ZTF
  ``mskimg`` (found beside a ``sciimg`` automatically, ``mask='auto'``) or any mask file
  (``mask=PATH``: non-zero = bad, or ZTF bits when it is a ZTF ``mskimg``).
* Header values (keyword options override them): gain ``GAIN`` [e-/ADU], read noise
  ``READNOI``/``RDNOISE``/``READNOIS`` [e-], saturation ``SATURATE``/``SATURAT``/``SATLEVEL``
  [ADU], zero point ``MAGZP``/``MAGZPT`` [mag], seeing ``SEEING`` [arcsec FWHM], exposure
  time ``EXPTIME``. A header ``GAIN`` is *not* used when ``BUNIT`` says the pixels are a
  calibrated surface brightness or flux (e.g. Spitzer ``MJy/sr``): it converts electrons to
  DN, not to those units (``Exposure.notes`` says so).
* WCS: kept only when celestial (RA/Dec, Galactic, ... any frame astropy recognises:
  a Galactic ``GLON-CAR`` mosaic is celestial); otherwise ``wcs`` is None and
  ``wcs_note`` says why. DSS plate solutions (``PLTRAH``/``AMDX``) are read by astropy.
  ``pixel_scale`` [arcsec/px] is the geometric mean of the WCS pixel scales at the
  reference point (``pixel_scale=`` overrides, e.g. for an image without WCS).

Corrupt input
-------------
The whole file is read and checked when opened (data included; ``CHECKSUM``/``DATASUM``
verified when present), so a truncated or corrupt download fails here with
:class:`ExposureError` ``"<path>: <problem>"`` (e.g. ``truncated: 122400 of 244800 bytes``)
rather than later with a traceback.
"""

import gzip
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning

from . import ztf

log = logging.getLogger(__name__)

__all__ = ["Exposure", "ExposureError", "read_exposure", "find_ztf_mask", "DEFAULT_BAD_BITS", "header_value"]

#: ZTF mask bits treated as bad by default: every bit but the two source-detection bits.
DEFAULT_BAD_BITS = ztf.DEFAULT_BAD_BITS

_KEYS = {
    "gain": ("GAIN",),
    "read_noise": ("READNOI", "RDNOISE", "READNOIS", "RON"),
    "saturation": ("SATURATE", "SATURAT", "SATLEVEL"),
    "zeropoint": ("MAGZP", "MAGZPT"),
    "seeing": ("SEEING",),
    "exptime": ("EXPTIME", "EXPOSURE"),
    "filter": ("FILTER", "FILTERID"),
}
# BUNIT values whose pixels are not detector counts: a header GAIN [e-/DN] does not apply
_CALIBRATED_UNITS = re.compile(r"jy|/sr|erg|w/m|mag|nmgy", re.IGNORECASE)


class ExposureError(ValueError):
    """An image that cannot be used; the message starts with the file path."""


@dataclass
class Exposure:
    """One image ready for star selection and fitting (pixel coordinates 0-based).

    Attributes
    ----------
    path : Path
    data : ndarray (ny, nx), float32 or float64, native byte order. NaN where the file has NaN.
    mask : ndarray bool (ny, nx)
        True where a pixel is unusable: NaN/inf, bad mask bits, user mask. Saturated pixels
        are in ``saturated``, not here.
    saturated : ndarray bool (ny, nx)
        ``data >= saturation`` (all False when the saturation level is unknown).
    wcs : astropy.wcs.WCS or None
        The celestial WCS (2 axes); None when absent or not celestial, ``wcs_note`` says why.
    gain [e-/ADU], read_noise [e-], saturation [ADU], zeropoint [mag], seeing [arcsec],
    pixel_scale [arcsec/px], exptime [s] : float or None when unknown
    header : astropy.io.fits.Header of the image HDU
    ztf : dict or None
        :func:`ztfpsf.io.ztf.parse_filename` of the file name (date, field, filter, ccd,
        qid, rcid) for a ZTF file.
    mask_path : Path or None
        The mask file used.
    filter : str or None
        ZTF filter from the name, else the header ``FILTER``.
    sources : dict
        Where each value came from: ``{'gain': 'header GAIN', 'read_noise': 'option', ...}``.
    notes : list of str
        Things worth telling the user (ignored keywords, NaN regions, ...); also logged.
    """

    path: Path
    data: np.ndarray
    mask: np.ndarray
    saturated: np.ndarray
    wcs: object = None
    wcs_note: str = ""
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    zeropoint: float | None = None
    seeing: float | None = None
    pixel_scale: float | None = None
    exptime: float | None = None
    filter: str | None = None
    header: fits.Header = field(default_factory=fits.Header)
    ztf: dict | None = None
    mask_path: Path | None = None
    hdu: int = 0
    sources: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def shape(self):
        return self.data.shape

    @property
    def name(self):
        return self.path.name

    def usable(self):
        """Boolean image of pixels that may be used (not masked, not saturated)."""
        return ~(self.mask | self.saturated)

    def summary(self):
        """Small JSON-friendly dict of what was read (for logs and the run summary)."""
        out = {
            "path": str(self.path),
            "shape": list(self.shape),
            "hdu": self.hdu,
            "mask_path": None if self.mask_path is None else str(self.mask_path),
            "masked_pixels": int(self.mask.sum()),
            "saturated_pixels": int(self.saturated.sum()),
            "wcs": self.wcs is not None,
            "wcs_note": self.wcs_note,
        }
        for key in ("gain", "read_noise", "saturation", "zeropoint", "seeing", "pixel_scale", "exptime", "filter"):
            out[key] = getattr(self, key)
        out["sources"] = dict(self.sources)
        if self.ztf:
            out["ztf"] = dict(self.ztf)
        out["notes"] = list(self.notes)
        return out


# --------------------------------------------------------------------------------------
# opening and verifying the file
# --------------------------------------------------------------------------------------
def _raw_bytes(path):
    """The file's uncompressed bytes (gzip undone), or raise ExposureError."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, gzip.BadGzipFile) as err:
            raise ExposureError(f"{path}: corrupt or truncated gzip file ({err})") from None
    return raw


def _card_int(cards, key, default=None):
    """Integer value of ``key`` among raw 80-byte header cards."""
    name = key.ljust(8).encode()
    for card in cards:
        if card[:8] == name and card[8:10] == b"= ":
            try:
                return int(card[10:].split(b"/")[0].strip())
            except ValueError:
                break
    if default is None:
        raise KeyError(key)
    return default


def _layout_problem(raw):
    """Walk the FITS blocks of ``raw`` (headers parsed by hand) and describe what is wrong:
    not FITS, a header without END, or fewer bytes than the headers announce. None if the
    layout is complete."""
    if not raw:
        return "empty file (0 bytes)"
    if not raw.startswith(b"SIMPLE  ="):
        return f"not a FITS file (it does not start with a SIMPLE card; first bytes {raw[:16]!r})"
    pos, n_hdu = 0, 0
    while pos < len(raw):
        end = None
        for block in range(pos, len(raw), 2880):
            chunk = raw[block : block + 2880]
            cards = [chunk[i : i + 80] for i in range(0, len(chunk), 80)]
            if any(c.startswith(b"END") and c[3:].strip() == b"" for c in cards):
                end = block + 2880
                break
        if end is None:
            return f"truncated: {len(raw)} bytes, the header of HDU {n_hdu} has no END card"
        header = raw[pos:end]
        header = [header[i : i + 80] for i in range(0, len(header), 80)]
        try:
            bitpix = abs(_card_int(header, "BITPIX"))
            naxis = _card_int(header, "NAXIS")
            dims = [_card_int(header, f"NAXIS{i + 1}") for i in range(naxis)]
        except KeyError as err:
            return f"corrupt header in HDU {n_hdu} (no {err.args[0]} card)"
        pcount, gcount = _card_int(header, "PCOUNT", 0), _card_int(header, "GCOUNT", 1)
        nbytes = bitpix // 8 * gcount * (pcount + (int(np.prod(dims)) if naxis else 0))
        padded = -(-nbytes // 2880) * 2880
        if end + nbytes > len(raw):
            expected = end + padded
            return (
                f"truncated: {len(raw)} of at least {expected} bytes (the data of HDU {n_hdu} "
                f"stop early; an incomplete download?)"
            )
        pos = end + padded
        n_hdu += 1
        if raw[pos : pos + 2880].strip(b"\0 ") == b"":
            break
    return None


def _describe_failure(path, err, caught):
    """One-line problem for a file astropy could not read."""
    try:
        problem = _layout_problem(_raw_bytes(path))
    except ExposureError:
        raise
    except Exception:  # pragma: no cover - diagnosis must never hide the original error
        problem = None
    if problem:
        return problem
    detail = " ".join(str(w.message).split("\n")[0] for w in caught if issubclass(w.category, Warning))
    return f"corrupt FITS file ({type(err).__name__}: {err}{'; ' + detail if detail else ''})"


def _open_verified(path):
    """Open ``path``, read every HDU's data and verify checksums; return the HDUList."""
    if not path.exists():
        raise ExposureError(f"{path}: no such file")
    if not path.is_file():
        raise ExposureError(f"{path}: not a file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            source = path
            with open(path, "rb") as f:
                if f.read(2) == b"\x1f\x8b":
                    # decompress in full first: a gzip stream cut short can still hold a
                    # complete-looking FITS file, only the full decompression notices
                    source = io.BytesIO(_raw_bytes(path))
            hdul = fits.open(source, memmap=False, checksum=True, lazy_load_hdus=False)
            for hdu in hdul:
                _ = hdu.data  # forces the read: truncation shows up here, not later
        except Exception as err:
            raise ExposureError(f"{path}: {_describe_failure(path, err, caught)}") from None
    for w in caught:
        text = str(w.message)
        if "truncated" in text:
            hdul.close()
            raise ExposureError(f"{path}: {_layout_problem(_raw_bytes(path)) or text.strip()}")
        if issubclass(w.category, AstropyUserWarning) and "verification failed" in text:
            hdul.close()
            raise ExposureError(f"{path}: corrupt file: {text.strip()} (download it again)")
    return hdul


def _pick_image_hdu(path, hdul, hdu):
    """Index of the image HDU: ``hdu`` if given (int or EXTNAME), else the first 2-D image."""
    if hdu is not None:
        try:
            index = hdul.index_of(hdu)
            _ = hdul[index]
        except (KeyError, IndexError):
            names = [h.name for h in hdul]
            raise ExposureError(f"{path}: no HDU {hdu!r} (the file has {len(hdul)}: {names})") from None
        data = hdul[index].data
        if not _is_image(hdul[index]):
            shape = None if data is None else getattr(data, "shape", None)
            raise ExposureError(f"{path}: HDU {hdu!r} holds no 2-D image (data shape {shape})")
        return index
    for index, h in enumerate(hdul):
        if _is_image(h):
            return index
    kinds = ", ".join(f"{i}: {type(h).__name__} {getattr(h.data, 'shape', None)}" for i, h in enumerate(hdul))
    raise ExposureError(f"{path}: no 2-D image in any HDU ({kinds})")


def _is_image(h):
    data = h.data
    if not isinstance(h, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) or data is None:
        return False
    shape = tuple(s for s in data.shape if s != 1) if data.ndim > 2 else data.shape
    return len(shape) == 2 and min(shape) > 0


def _as_float_image(data):
    data = np.asarray(data)
    if data.ndim > 2:
        data = data.reshape([s for s in data.shape if s != 1])
    dtype = np.float64 if data.dtype.kind == "f" and data.dtype.itemsize == 8 else np.float32
    return np.ascontiguousarray(data, dtype=np.dtype(dtype).newbyteorder("="))


# --------------------------------------------------------------------------------------
# header values, WCS
# --------------------------------------------------------------------------------------
def header_value(header, keys, cast=float):
    """First of ``keys`` present in ``header`` with a usable value, as ``(value, key)``;
    ``(None, None)`` when none is (non-numeric, NaN or empty values are skipped)."""
    for key in keys:
        if key in header:
            try:
                value = cast(header[key])
            except (TypeError, ValueError):
                continue
            if cast is float and not np.isfinite(value):
                continue
            if cast is str:
                value = value.strip()
                if not value:
                    continue
            return value, key
    return None, None


def _celestial_wcs(header, hdul):
    """(WCS or None, note, pixel scale arcsec/px or None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, fobj=hdul, relax=True)
        except Exception as err:
            return None, f"WCS could not be read ({type(err).__name__}: {err})", None
    ctypes = [c for c in wcs.wcs.ctype]
    if not wcs.has_celestial:
        if not any(c.strip() for c in ctypes):
            return None, "no WCS in the header (no CTYPE)", None
        return None, f"WCS is not celestial (CTYPE {ctypes})", None
    cel = wcs.celestial
    if cel.pixel_n_dim != 2 or cel.naxis != 2:
        return None, f"celestial WCS does not map the 2 image axes (CTYPE {ctypes})", None
    try:
        scales = cel.proj_plane_pixel_scales()
        scale = float(np.sqrt(np.prod([s.to_value("arcsec") for s in scales])))
    except Exception as err:  # a degenerate matrix
        return None, f"celestial WCS is degenerate ({err})", None
    if not (np.isfinite(scale) and scale > 0):
        return None, "celestial WCS has a zero or non-finite pixel scale", None
    frame = "".join(c[:4].rstrip("-") + " " for c in cel.wcs.ctype).strip()
    return cel, f"celestial WCS ({frame}, {'DSS plate solution' if 'PLTRAH' in header else cel.wcs.ctype[0][5:]})", scale


# --------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------
def find_ztf_mask(path):
    """The ``mskimg`` file beside a ZTF ``sciimg`` (same name; .fits, .fits.gz or .fits.fz), or None."""
    path = Path(path)
    name = ztf.mskimg_name(path.name)
    if name is None:
        return None
    stem = name.split("_mskimg", 1)[0] + "_mskimg"
    for candidate in dict.fromkeys([name, stem + ".fits", stem + ".fits.gz", stem + ".fits.fz"]):
        if (path.parent / candidate).exists():
            return path.parent / candidate
    return None


def _read_mask(image_path, mask_path, shape, bad_bits):
    """Boolean bad-pixel image from a mask file (ZTF bits for a ZTF mskimg, else != 0)."""
    mask_path = Path(mask_path)
    hdul = _open_verified(mask_path)
    try:
        index = _pick_image_hdu(mask_path, hdul, None)
        values = np.asarray(hdul[index].data)
        if values.ndim > 2:
            values = values.reshape([s for s in values.shape if s != 1])
    finally:
        hdul.close()
    if values.shape != shape:
        raise ExposureError(f"{mask_path}: mask shape {values.shape} differs from the image {image_path} shape {shape}")
    info = ztf.parse_filename(mask_path.name)
    if info is not None and info["suffix"] == "mskimg":
        value = ztf.bad_bits_value(bad_bits)
        return ztf.mask_from_bits(values, value), f"ZTF bits {value:#06x}"
    if np.issubdtype(values.dtype, np.floating):
        return ~np.isfinite(values) | (values != 0), "non-zero"
    return values != 0, "non-zero"


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def read_exposure(
    path,
    *,
    mask="auto",
    bad_bits=DEFAULT_BAD_BITS,
    hdu=None,
    gain=None,
    read_noise=None,
    saturation=None,
    zeropoint=None,
    seeing=None,
    pixel_scale=None,
):
    """Read an image and everything the fit needs from it.

    Parameters
    ----------
    path : str or Path
        FITS image (``.fits``, ``.fits.gz``, ``.fz``); a ZTF ``sciimg`` or any image.
    mask : 'auto', None, str or Path
        ``'auto'``: the ZTF ``mskimg`` beside a ``sciimg`` when it exists (nothing for other
        images); ``None``: no mask file; a path: that mask file (ZTF bits if it is a ZTF
        ``mskimg``, else non-zero = bad). NaN/inf pixels are always masked.
    bad_bits : names, comma-separated str or int
        ZTF mask bits that make a pixel unusable (default :data:`DEFAULT_BAD_BITS`: all but
        ``sexsources`` and ``psfsources``); see :data:`ztfpsf.io.ztf.MASK_BITS`.
    hdu : int or str, optional
        Image HDU (index or EXTNAME); default the first HDU holding a 2-D image.
    gain, read_noise, saturation, zeropoint, seeing, pixel_scale : float, optional
        Override the header values (units: e-/ADU, e-, ADU, mag, arcsec, arcsec/px).

    Returns
    -------
    Exposure

    Raises
    ------
    ExposureError
        ``"<path>: <problem>"`` for a missing, truncated, corrupt, non-FITS or image-less file,
        an unreadable mask or a mask of another shape.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        # non-standard cards (e.g. ESO-LOG) and WCS fix-ups are harmless: logged, not shown
        warnings.simplefilter("always")
        hdul = _open_verified(path)
        try:
            index = _pick_image_hdu(path, hdul, hdu)
            header = _merged_header(hdul, index)
            data = _as_float_image(hdul[index].data)
            wcs, wcs_note, wcs_scale = _celestial_wcs(header, hdul)
        finally:
            hdul.close()
    for message in sorted({str(w.message).split("\n")[0] for w in caught}):
        log.debug("%s: %s", path.name, message)

    exp = Exposure(path=path, data=data, mask=~np.isfinite(data), saturated=np.zeros(data.shape, bool), header=header, hdu=index)
    exp.wcs, exp.wcs_note = wcs, wcs_note
    exp.ztf = ztf.parse_filename(path.name)
    _set_header_values(exp, header, gain=gain, read_noise=read_noise, saturation=saturation, zeropoint=zeropoint, seeing=seeing)
    _set_pixel_scale(exp, header, wcs_scale, pixel_scale)
    _apply_mask(exp, mask, bad_bits)
    if exp.saturation is not None:
        with np.errstate(invalid="ignore"):
            exp.saturated = np.isfinite(data) & (data >= exp.saturation)
    _note_bad_regions(exp)
    log.info(
        "%s: %dx%d px, %s, gain %s, read noise %s, saturation %s, zero point %s, pixel scale %s, %d masked px",
        path.name, data.shape[1], data.shape[0], wcs_note, exp.gain, exp.read_noise, exp.saturation,
        exp.zeropoint, None if exp.pixel_scale is None else round(exp.pixel_scale, 4), int(exp.mask.sum()),
    )  # fmt: skip
    return exp


def _merged_header(hdul, index):
    """The image HDU's header, completed by the primary header's keywords (instrument,
    gain, ...) when the image is in an extension."""
    header = hdul[index].header.copy()
    if index > 0 and isinstance(hdul[0], fits.PrimaryHDU):
        for card in hdul[0].header.cards:
            if card.keyword and card.keyword not in header and card.keyword not in ("COMMENT", "HISTORY"):
                try:
                    header.append(card)
                except Exception:  # pragma: no cover - a card astropy refuses
                    pass
    return header


def _set_header_values(exp, header, **options):
    for name, value in options.items():
        if value is not None:
            setattr(exp, name, float(value))
            exp.sources[name] = "option"
            continue
        value, key = header_value(header, _KEYS[name])
        if value is None:
            continue
        if name == "gain":
            bunit = str(header.get("BUNIT", "")).strip()
            if _CALIBRATED_UNITS.search(bunit):
                exp.notes.append(f"header GAIN {value} not used: BUNIT {bunit!r} is not detector counts")
                continue
            if not value > 0:
                exp.notes.append(f"header GAIN {value} not used (must be > 0; SExtractor-style 0 means unknown)")
                continue
        if name in ("read_noise", "saturation") and not value > 0:
            exp.notes.append(f"header {key} {value} not used (must be > 0)")
            continue
        setattr(exp, name, value)
        exp.sources[name] = f"header {key}"
    value, key = header_value(header, _KEYS["exptime"])
    if value is not None:
        exp.exptime, exp.sources["exptime"] = value, f"header {key}"
    exp.filter = exp.ztf["filter"] if exp.ztf else header_value(header, _KEYS["filter"], str)[0]


def _set_pixel_scale(exp, header, wcs_scale, option):
    if option is not None:
        exp.pixel_scale, exp.sources["pixel_scale"] = float(option), "option"
    elif wcs_scale is not None:
        exp.pixel_scale, exp.sources["pixel_scale"] = wcs_scale, "WCS"
    else:
        value, key = header_value(header, ("PIXSCALE", "PIXSCAL1", "SECPIX", "SECPIX1"))
        if value is not None and value > 0:
            exp.pixel_scale, exp.sources["pixel_scale"] = abs(value), f"header {key}"


def _apply_mask(exp, mask, bad_bits):
    if isinstance(mask, str) and mask == "auto":
        mask_path = find_ztf_mask(exp.path)
        if mask_path is None and exp.ztf and exp.ztf["suffix"] == "sciimg":
            exp.notes.append("no ZTF mskimg beside the sciimg: only NaN pixels are masked")
    else:
        mask_path = None if mask is None else Path(mask)
    if mask_path is None:
        return
    bad, rule = _read_mask(exp.path, mask_path, exp.data.shape, bad_bits)
    exp.mask |= bad
    exp.mask_path = mask_path
    log.info("%s: mask %s (%s): %d bad pixels", exp.path.name, mask_path.name, rule, int(bad.sum()))


def _note_bad_regions(exp):
    n_bad = int((~np.isfinite(exp.data)).sum())
    if n_bad:
        frac = n_bad / exp.data.size
        exp.notes.append(f"{n_bad} NaN/inf pixels ({100 * frac:.1f} %) masked")
        if frac > 0.5:
            log.warning("%s: %.0f %% of the pixels are NaN/inf (masked)", exp.path.name, 100 * frac)
    if exp.mask.all():
        log.warning("%s: every pixel is masked: no star can be measured", exp.path.name)
    for note in exp.notes:
        log.info("%s: %s", exp.path.name, note)
