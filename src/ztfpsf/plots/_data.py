"""Reading a run's outputs back, and the arrays every figure shares (no matplotlib here).

The figures never re-fit: a star's model stamp is re-rendered from the parameters in the
results table, on the stamp cut from the image at the place the fit used
(``origin = round(x_init) - size // 2``).
"""

import logging
import warnings
from pathlib import Path

import numpy as np

from .._jax import with_x64
from ..flags import BAD

log = logging.getLogger(__name__)

__all__ = [
    "read_results",
    "read_image",
    "read_mask",
    "read_history",
    "cut_stamps",
    "stamp_origins",
    "render_models",
    "stamps_and_models",
    "noise_sigma",
    "chi2_per_dof",
    "fitted_rows",
]

#: Stamp size used when the metadata does not say.
DEFAULT_STAMP_SIZE = 17


def stem_of(path):
    """Image stem of a results file: ``<stem>.stars.parquet`` -> ``<stem>``."""
    name = Path(path).name
    for suffix in (".stars.parquet", ".parquet"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_results(path):
    """A ``<stem>.stars.parquet`` file as an astropy Table; its ``ztfpsf`` metadata in ``meta``.

    Raises FileNotFoundError or ValueError (naming the file) when it is missing, not
    Parquet, or has no ``ztfpsf`` metadata.
    """
    from ..io.results import read_parquet

    path = Path(path)
    table = read_parquet(path)
    if "version" not in table.meta:
        raise ValueError(f"{path}: no 'ztfpsf' metadata in the Parquet schema; is it a ztfpsf results file?")
    for name in ("x", "y", "chi2", "flux", "flags"):
        if name not in table.colnames:
            raise ValueError(f"{path}: column {name!r} missing; is it a ztfpsf results file?")
    table.meta["path"] = str(path)
    table.meta.setdefault("stamp_size", DEFAULT_STAMP_SIZE)
    return table


def _first_image_hdu(hdul, path):
    for hdu in hdul:
        if hdu.data is not None and hdu.data.ndim == 2:
            return hdu.data
    raise ValueError(f"{path}: no 2-D image in any HDU")


def read_image(path):
    """The first 2-D image of a FITS file as float64 (ADU)."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with fits.open(path, memmap=False) as hdul:
            return np.asarray(_first_image_hdu(hdul, path), dtype=np.float64)
    except OSError as err:
        raise ValueError(f"{path}: not a readable FITS file ({err})") from None


def _bad_bits(meta):
    from ..io.ztf import DEFAULT_BAD_BITS, bad_bits_value

    bits = (meta.get("options") or {}).get("bad_bits")
    if bits is None:
        return bad_bits_value(DEFAULT_BAD_BITS)
    if isinstance(bits, (int, np.integer)):
        return int(bits)
    return bad_bits_value(bits)


def read_mask(meta, shape):
    """Boolean mask (True = unusable) from the run's mask file, or None without one."""
    path = meta.get("mask")
    if not path:
        return None
    try:
        mask = read_image(path)
    except (FileNotFoundError, ValueError) as err:
        log.warning("mask not used in the figures: %s", err)
        return None
    if mask.shape != tuple(shape):
        log.warning("mask not used in the figures: %s has shape %s, the image %s", path, mask.shape, tuple(shape))
        return None
    return (mask.astype(np.int64) & _bad_bits(meta)) != 0


def read_history(path, n_rows=None):
    """Loss history ``(N, n_iter)`` from a ``<stem>.history.npy`` file (NaN after a loop ended)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no loss history; fit with history recorded (return_history=True)")
    hist = np.load(path, allow_pickle=False)
    if hist.ndim != 2 or (n_rows is not None and hist.shape[0] != n_rows):
        raise ValueError(f"{path}: loss history must have shape (stars={n_rows}, iterations); got {hist.shape}")
    return np.asarray(hist, dtype=np.float64)


def stamp_origins(table, size):
    """Integer image (x, y) of each stamp's pixel [0, 0]: ``round(x_init) - size // 2``
    (halves rounded up, as :meth:`ztfpsf.psf.PSFModel.stamp_origin`)."""
    from ..stamps import stamp_origin

    xc, yc = ("x_init", "y_init") if "x_init" in table.colnames else ("x", "y")
    x0, y0 = stamp_origin(table[xc], table[yc], size)
    x0 = np.where(np.isfinite(x0), x0, 0).astype(np.int64)
    y0 = np.where(np.isfinite(y0), y0, 0).astype(np.int64)
    return np.stack([x0, y0], axis=1)


def cut_stamps(image, origins, size, mask=None):
    """``(N, size, size)`` stamps at integer ``origins`` (x, y); NaN off the image and where masked."""
    from ..stamps import cut

    image = np.asarray(image, dtype=np.float64)
    if mask is not None:
        image = np.where(mask, np.nan, image)
    return cut(image, origins[:, 0], origins[:, 1], size)


def stamps_and_models(table, image, mask=None, psf=None):
    """Stamp origins, data stamps cut from the image and re-rendered model stamps of the rows.

    ``psf``: the run's PSF model (``<stem>.psf.fits``); a table measured with it (``--psf
    shared|varying``) is rendered with it, residual surface and flux scale included."""
    size = int(table.meta.get("stamp_size", DEFAULT_STAMP_SIZE))
    origins = stamp_origins(table, size)
    if psf is not None and table.meta.get("psf") in ("shared", "varying"):
        models = render_with_psf(table, psf, origins, size)
    else:
        models = render_models(table, origins, size)
    return origins, cut_stamps(image, origins, size, mask), models


def render_with_psf(table, psf, origins, size):
    """Model stamps ``flux * PSF + background`` with the PSF model the table was measured
    with (its flux is the flux within the PSF's flux radius); NaN rows stay NaN."""
    col = lambda name: np.asarray(table[name], dtype=np.float64)
    x, y = col("x"), col("y")
    ok = np.isfinite(x) & np.isfinite(y)
    out = np.full((len(table), size, size), np.nan)
    if ok.any():
        unit = psf.render(x[ok], y[ok], origins[ok], (size, size))
        out[ok] = unit * col("flux")[ok, None, None] + col("background")[ok, None, None]
    return out


@with_x64  # the fit's values, rendered in float64 whatever the host's JAX setting
def render_models(table, origins, size):
    """Model stamps ``(N, size, size)`` from the table's parameters (NaN rows stay NaN).

    Uses the same model and pixel integration as the fit (``meta['model']``,
    ``meta['integration']``); nothing is re-fitted.
    """
    import jax.numpy as jnp

    from ..models import get_model

    model = get_model(table.meta.get("model", "moffat"), table.meta.get("integration"))
    missing = [n for n in model.shape_names if n not in table.colnames]
    if missing:
        raise ValueError(f"results table lacks the {model.name} shape columns {missing}")
    col = lambda name: jnp.asarray(np.asarray(table[name], dtype=np.float64))
    x = col("x") - origins[:, 0]
    y = col("y") - origins[:, 1]
    shape = tuple(col(n) for n in model.shape_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        img = model.image(col("flux"), x, y, shape, col("background"), size, size)
    return np.asarray(img, dtype=np.float64)


def noise_sigma(model, residual, meta, read_noise=None):
    """Per-pixel noise sigma [ADU] of stamps, and how it was obtained.

    With ``gain`` [e-/ADU] (and ``read_noise`` [e-]) in the metadata: the fit's own noise
    model, ``sqrt(model/gain + sky/gain + (read_noise/gain)**2)``; ``read_noise`` (per
    row, the table's ``read_noise`` column) is the effective read noise the fit used with
    the measured sky noise. Without: each stamp's robust residual scatter (1.4826 MAD),
    constant over the stamp.
    """
    gain = meta.get("gain")
    if gain:
        rn = meta.get("read_noise") or 0.0
        if read_noise is not None:
            rn = np.asarray(read_noise, dtype=np.float64)[:, None, None]
        sky = (meta.get("options") or {}).get("sky", meta.get("sky")) or 0.0
        var = np.clip(model, 0.0, None) / gain + sky / gain + (rn / gain) ** 2
        return np.sqrt(var), "noise model (gain, read noise)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        flat = residual.reshape(residual.shape[0], -1)
        med = np.nanmedian(flat, axis=1)
        mad = 1.4826 * np.nanmedian(np.abs(flat - med[:, None]), axis=1)
    mad = np.where(np.isfinite(mad) & (mad > 0), mad, np.nan)
    return np.broadcast_to(mad[:, None, None], residual.shape).copy(), "robust residual scatter (no gain)"


def chi2_per_dof(table):
    """chi2/dof of every row (NaN where undefined)."""
    chi2 = np.asarray(table["chi2"], dtype=np.float64)
    dof = np.asarray(table["dof"], dtype=np.float64) if "dof" in table.colnames else np.full(len(table), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(dof > 0, chi2 / dof, np.nan)


def fitted_rows(table):
    """Rows with measured values: no bit of :data:`ztfpsf.flags.BAD` set, finite x, y, flux."""
    flags = np.asarray(table["flags"], dtype=np.int64)
    ok = (flags & int(BAD)) == 0
    for name in ("x", "y", "flux"):
        ok &= np.isfinite(np.asarray(table[name], dtype=np.float64))
    return ok
