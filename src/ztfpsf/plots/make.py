"""All figures of one run from its output files (what ``ztfpsf plot`` and the report call)."""

import logging
from pathlib import Path

import numpy as np

from ..io.results import result_paths
from . import _data
from .loss import compute_loss, plot_loss
from .maps import compute_maps, load_psf_model, plot_maps
from .brighter_fatter import compute_brighter_fatter, plot_brighter_fatter
from .psf import compute_psf, plot_psf
from .residuals import compute_residuals, plot_residuals
from .stars import plot_stars
from .timing import compute_timing, plot_timing, read_timings

log = logging.getLogger(__name__)

__all__ = ["KINDS", "Run", "load_run", "make_figures", "make_timing_figure"]

#: Figure kinds drawn from a results file.
KINDS = ("stars", "maps", "residuals", "loss", "psf", "brighter_fatter")


class Run:
    """One image's outputs read back: ``table`` (with the metadata in ``table.meta``),
    ``image`` (array or None), ``mask``, ``history`` (array or None), ``psf_model``, ``stem``."""

    def __init__(self, table, image=None, mask=None, history=None, psf_model=None, stem="ztfpsf", image_error=None):
        self.table, self.image, self.mask = table, image, mask
        self.history, self.psf_model, self.stem = history, psf_model, stem
        self.image_error = image_error


def load_run(results, image=None, psf=None, history=None):
    """Read a ``<stem>.stars.parquet`` file and what the figures need beside it.

    ``image``: FITS path or array (default: the path in the metadata). A missing image is
    not an error here (``run.image`` is None and ``run.image_error`` says why); figures
    that need the pixels then say so. ``psf``: PSF model object or file (default
    ``<stem>.psf.fits`` beside the results, when it exists and ``ztfpsf.psf`` is
    available). ``history``: array or ``.npy`` file (default ``<stem>.history.npy``
    beside the results, when it exists).
    """
    table = results if not isinstance(results, (str, Path)) else _data.read_results(results)
    beside = None  # outputs next to the results file, when there is one
    if "path" in table.meta:
        stem = _data.stem_of(table.meta["path"])
        beside = result_paths(Path(table.meta["path"]).parent, stem)
    else:
        stem = table.meta.get("stem", "ztfpsf")
    img, err = _load_image(table, image)
    mask = _data.read_mask(table.meta, img.shape) if img is not None else None
    if isinstance(psf, (str, Path)):
        if not Path(psf).is_file():
            raise FileNotFoundError(f"{psf}: no such PSF model file")
        psf = load_psf_model(psf)
    elif psf is None and beside is not None:
        psf = _optional(load_psf_model, beside["psf"])
    if isinstance(history, (str, Path)):
        history = _data.read_history(history, len(table))
    elif history is None and beside is not None and beside["history"].is_file():
        history = _optional(_data.read_history, beside["history"], len(table))
    if history is None and "loss_history" in table.meta:
        history = np.asarray(table.meta["loss_history"], dtype=np.float64)
    return Run(table, img, mask, history, psf, stem, image_error=err)


def _load_image(table, image):
    """(pixels or None, why not): an array as given, else the FITS file given or recorded."""
    if image is not None and not isinstance(image, (str, Path)):
        return np.asarray(image, dtype=np.float64), None
    source = image or table.meta.get("image")
    if not source:
        return None, "no image path given or recorded in the results metadata"
    try:
        return _data.read_image(source), None
    except (FileNotFoundError, ValueError) as err:
        return None, str(err)


def _optional(read, *args):
    """An output found beside the results: read it, or log why not and go on without it."""
    try:
        return read(*args)
    except (OSError, ValueError) as err:
        log.warning("%s not used: %s", args[0], err)
        return None


def _draw(kind, run, out_dir, fmt, ids, worst, typical):
    stem = run.stem
    if kind == "stars":
        return plot_stars(run.table, run.image, out_dir, stem, ids=ids, worst=worst, typical=typical, mask=run.mask, fmt=fmt,
                          psf=run.psf_model)
    path = Path(out_dir) / f"{stem}.{kind}.{fmt}"
    if kind == "maps":
        plot_maps(compute_maps(run.table, run.psf_model), path)
    elif kind == "residuals":
        plot_residuals(compute_residuals(run.table, run.image, run.mask, psf=run.psf_model), path)
    elif kind == "loss":
        dof = run.table["dof"] if "dof" in run.table.colnames else None
        plot_loss(compute_loss({run.table.meta.get("method", "fit"): run.history}, dof=dof), path)
    elif kind == "psf":
        plot_psf(compute_psf(run.psf_model, run.psf_model.meta.get("reserve_by_snr")), path)
    elif kind == "brighter_fatter":
        plot_brighter_fatter(compute_brighter_fatter(run.table, run.psf_model, run.image, run.mask), path)
    return [path]


def make_figures(results, *, out_dir=None, kinds=None, image=None, ids=None, worst=5, typical=3, psf=None,
                 history=None, fmt="png"):
    """Draw the figures of one results file; returns ``{kind: [paths]}``.

    ``kinds``: any of :data:`KINDS`; None draws every kind the outputs allow (``stars``
    needs the image, ``loss`` a recorded history), and skips the others with a log
    message. A kind asked for by name that cannot be drawn raises ValueError saying why.
    ``out_dir`` defaults to the results file's folder. File names:
    ``<stem>.star-<id>.png``, ``<stem>.maps.png``, ``<stem>.residuals.png``, ``<stem>.loss.png``,
    ``<stem>.psf.png`` (the PSF model: its stamp, residual surface, reserve stars by S/N),
    ``<stem>.brighter_fatter.png`` (size and PSF - aperture magnitude against flux).
    """
    run = results if isinstance(results, Run) else load_run(results, image=image, psf=psf, history=history)
    if out_dir is None:
        out_dir = Path(run.table.meta["path"]).parent if "path" in run.table.meta else Path(".")
    asked = kinds is not None
    kinds = list(KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown figure kind {unknown[0]!r}; use {', '.join(KINDS)}")
    out = {}
    for kind in kinds:
        why = None
        if kind == "stars" and run.image is None:
            why = f"per-star figures need the image: {run.image_error}"
        elif kind == "stars" and not (ids or worst or typical):
            why = "no stars chosen (ids, worst, typical)"
        elif kind == "loss" and run.history is None:
            why = "no loss history recorded for this run (fit with history to get one)"
        elif kind == "brighter_fatter" and run.psf_model is None:
            why = "the brighter-fatter figure measures stars against a PSF model (fit with --psf shared|varying)"
        elif kind == "psf" and run.psf_model is None:
            why = "no PSF model file beside the results (fit with --psf shared|varying to get one)"
        if why:
            if asked:
                raise ValueError(why)
            log.info("%s figure skipped: %s", kind, why)
            continue
        if kind == "residuals" and run.image is None:
            log.warning("residual stamps not drawn: %s", run.image_error)
        out[kind] = _draw(kind, run, out_dir, fmt, ids, worst, typical)
        log.debug("%s: %s", kind, ", ".join(str(p) for p in out[kind][:3]) + (" ..." if len(out[kind]) > 3 else ""))
    return out


def make_timing_figure(paths, out_path):
    """The timing figure of one or more benchmark JSON files, written to ``out_path``."""
    from ._style import save

    fig = plot_timing(compute_timing(read_timings(paths)))
    return save(fig, out_path)
