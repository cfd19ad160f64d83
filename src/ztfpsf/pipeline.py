"""One image, end to end: read -> stars -> select -> stamps -> fit -> write.

:func:`process_image` is the whole job for one image and returns its summary; many
images go through :func:`run`, which hands the same function to Dask
(:mod:`ztfpsf.parallel`). Outputs, per image ``<stem>`` (the file name without
``.fits``), in ``out_dir``:

``<stem>.stars.parquet``
    one row per selected star: ``id, ra, dec, mag`` (catalogue), then every column of
    :func:`ztfpsf.fit_stamps` in image coordinates (0-based, pixel centres at integers);
    schema metadata ``ztfpsf`` (JSON): version, input files, options, header values, units.
``<stem>.summary.json``
    counts after each selection cut, the noise model, median fwhm (px and arcsec) and
    alpha, how many stars converged or were flagged, timings per stage.
``<stem>.psf.fits``
    with ``--psf shared|varying``: the quadrant's PSF model (:class:`ztfpsf.PSFModel`).
``<stem>.history.npy``
    with ``history``: every star's chi2 per iteration (rows in table order).
``run_summary.json`` (from :func:`run`)
    every image's status, error and outputs, rewritten as each image finishes.

Nothing is lost or left half: every file is written atomically; an image's summary is
its commit mark, removed (with the image's other old outputs and any temporary file of an
interrupted write) before the image is processed and written last, and it carries the
``run`` token of the stars table it belongs to; a rerun skips only images whose summary
says ok and matches their table. Two inputs with the same stem are refused before
anything runs (their outputs would overwrite each other).
"""

import functools
import json
import logging
import os
import time
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import Table

from . import __version__
from .apcorr import aperture_check
from .config import HYBRID_MIN_STARS, FitConfig
from .detect import detect_stars, estimate_background
from .fitting import fit_stamps
from .fitting.api import value_columns
from .flags import BAD, Flag
from .io.catalog import read_catalog
from .io.fits import read_exposure
from .io.results import METADATA_KEY, read_json, result_paths, save_npy, write_json, write_parquet
from .models import get_model
from .parallel import map_files
from .selection import EmptySelectionWarning, select_stars
from .stamps import cut_stamps, noise_model

log = logging.getLogger(__name__)

__all__ = ["process_image", "run", "output_paths", "stem_of", "find_catalog"]

CATALOG_SUFFIXES = (".csv", ".ecsv", ".fits", ".fit", ".parquet")


def stem_of(path):
    """The image file name without ``.fits`` / ``.fits.gz`` / ``.fz``."""
    name = Path(path).name
    for ext in (".fits.gz", ".fits.fz", ".fits", ".fit", ".fz"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def output_paths(path, out_dir):
    """Paths of the outputs of image ``path`` in ``out_dir``."""
    return result_paths(out_dir, stem_of(path))


def find_catalog(image_path):
    """The catalogue beside an image: ``<name>_catalog.<ext>`` (``_sciimg`` dropped), or None."""
    stem = stem_of(image_path)
    base = stem[: -len("_sciimg")] if stem.endswith("_sciimg") else stem
    for suffix in CATALOG_SUFFIXES:
        candidate = Path(image_path).with_name(f"{base}_catalog{suffix}")
        if candidate.exists():
            return candidate
    return None


class _Stages:
    """Wall time of each stage of one image."""

    def __init__(self):
        self.seconds = {}
        self._t = time.perf_counter()

    def done(self, name):
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 4)
        self._t = now


def _stars(exposure, config, background):
    """The star list: a catalogue projected on the image, or detections."""
    source = config.catalog
    if source == "auto":
        source = find_catalog(exposure.path)
        if source is None:
            log.info("%s: no catalogue beside the image; detecting stars", exposure.name)
    if source is None:
        return detect_stars(exposure, background=background), "detection"
    table = read_catalog(
        source, wcs=exposure.wcs, image_shape=exposure.shape, prefer=config.catalog_positions,
        pixel_origin=config.catalog_origin, wcs_note=exposure.wcs_note,
    )  # fmt: skip
    return table, str(source)


def _empty_fit_table(config):
    model = get_model(config.model)
    cols = ["x_init", "y_init"]
    for name in value_columns(model):
        cols += [name, f"{name}_err"]
    t = Table({c: np.zeros(0) for c in cols + ["chi2"]})
    for c in ("dof", "n_iter", "flags"):
        t[c] = np.zeros(0, np.int32)
    return t


def _fit(stamps, exposure, config, noise):
    """Per-star fits; with a joint PSF model, the stars measured with that PSF.

    With ``psf`` 'shared' or 'varying' the table is the joint fit's (flux, x, y and
    background with the image's PSF; shape columns: the PSF at the star) and each star's own
    free-shape fit is kept as ``star_<name>`` (``star_fwhm``, ``star_alpha``...,
    ``star_flags``), which the PSF maps compare with the model.
    """
    common = dict(mask=stamps.mask, saturation=exposure.saturation, x_init=stamps.x_init, y_init=stamps.y_init, origin=stamps.origin, **noise)
    kw = dict(model=config.model, dtype=config.dtype, backend=config.backend)
    table = fit_stamps(stamps.data, **common, **kw, method=config.method, return_history=config.history)
    if config.psf == "independent":
        return table, None, None
    from .psf import fit_psf

    hybrid = config.psf_model == "hybrid" or (config.psf_model == "auto" and len(stamps) >= HYBRID_MIN_STARS)
    degree = _affordable_degree(config, len(stamps))
    try:
        # float64: in float32 the joint fit of the real ZTF quadrant (stars the Moffat misfits
        # at chi2/dof ~10) lost its convergence and most stars; simulations fit either way
        psf, joint, stats = fit_psf(
            stamps.data, **common, **{**kw, "dtype": "float64"}, mode=config.psf, degree=degree, reserve=config.reserve,
            seed=config.seed, image_shape=exposure.shape, image=str(exposure.path), hybrid=hybrid,
            residual_flux=hybrid and config.residual_flux,
        )  # fmt: skip
    except ValueError as err:  # too few usable stars even for one shared shape: keep the star fits
        log.warning("%s: no %s PSF model (%s); the independent star fits are kept", exposure.name, config.psf, err)
        return table, None, dict(error=str(err), degree_requested=config.degree)
    stats["degree_requested"] = config.degree
    if degree != config.degree:
        log.warning("%s: %d stars: PSF degree lowered from %d to %d", exposure.name, len(stamps), config.degree, degree)
    model = get_model(config.model)
    for name in ("fwhm",) + tuple(n for n in model.shape_names if n != "fwhm"):
        joint[f"star_{name}"] = table[name]
        joint[f"star_{name}_err"] = table[f"{name}_err"]
    joint["star_flags"] = table["flags"]
    joint.meta.update({k: v for k, v in table.meta.items() if k not in joint.meta})  # the joint fit's own kept
    return joint, psf, stats


def _brighter_fatter(config, psf, fit, stamps, exposure, noise):
    """The size and PSF - aperture trends against flux (every run) and, per
    ``config.brighter_fatter``, the flux-dependent PSF (:func:`ztfpsf.psf.brighter_fatter.apply`);
    the diagnostic's slopes go into the PSF file's header."""
    from .psf import brighter_fatter as bf

    psf, fit, info = bf.apply(
        config.brighter_fatter, psf, fit, stamps=stamps, image=exposure.data, mask=exposure.mask,
        zeropoint=exposure.zeropoint, gain=noise.get("gain"), read_noise=noise.get("read_noise"),
        saturation=exposure.saturation, backend=config.backend,
    )  # fmt: skip
    if psf is not None:
        psf.meta.update({f"bf_{k}": info.get(k) for k in ("size_slope", "size_slope_err", "apcorr_slope", "apcorr_slope_err")})
    return psf, fit, info


def _affordable_degree(config, n_stars):
    """The polynomial degree of a varying PSF that ``n_stars`` can constrain: at most the
    configured one, lowered until each coefficient has three stars (as ``fit_psf`` asks)."""
    if config.psf != "varying":
        return config.degree
    n_shape = get_model(config.model).n_shape
    degree = config.degree
    while degree > 0 and n_stars < 3 * (degree + 1) * (degree + 2) // 2 * n_shape:
        degree -= 1
    return degree


def _summary_numbers(table, exposure):
    ok = (np.asarray(table["flags"]) & BAD) == 0
    converged = ok & ((np.asarray(table["flags"]) & Flag.NOT_CONVERGED) == 0)
    clean = np.asarray(table["flags"]) == 0
    med = lambda name: float(np.median(table[name][clean])) if name in table.colnames and clean.any() else None
    fwhm = med("fwhm")
    return {
        "n_fitted": len(table),
        "n_converged": int(converged.sum()),
        "n_flags_zero": int(clean.sum()),
        "n_flagged": int((~clean).sum()),
        "n_failed": int((~ok).sum()),
        "fwhm_median_px": fwhm,
        "fwhm_median_arcsec": None if fwhm is None or not exposure.pixel_scale else fwhm * exposure.pixel_scale,
        "alpha_median": med("alpha"),
        "chi2_dof_median": float(np.median(table["chi2"][clean] / table["dof"][clean])) if clean.any() else None,
    }


def _metadata(exposure, config, noise_desc, source, fit_meta):
    return {
        "version": __version__,
        "image": str(Path(exposure.path).resolve()),
        "mask": None if exposure.mask_path is None else str(Path(exposure.mask_path).resolve()),
        "catalog": source,
        "model": config.model,
        "integration": fit_meta.get("integration", get_model(config.model).integration),
        "method": config.method,
        "stamp_size": config.stamp,
        "gain": exposure.gain,
        "read_noise": exposure.read_noise,
        "saturation": exposure.saturation,
        "zeropoint": exposure.zeropoint,
        "pixel_scale": exposure.pixel_scale,
        "image_shape": list(exposure.shape),
        "noise": noise_desc,
        "ztf": exposure.ztf,
        "options": dict(config.to_dict(), bad_bits=list(config.bad_bits), sky=0.0),
        "coordinates": "0-based pixel coordinates, pixel centres at integers",
        "errors": fit_meta.get("errors"),
        "psf": fit_meta.get("psf", "independent"),  # what the table's rows were measured with
    }


def process_image(path, config=None, out_dir=".", **options):
    """Measure the PSF of one image; write its outputs; return its summary (a dict).

    ``options`` override fields of ``config`` (a :class:`ztfpsf.config.FitConfig`).
    Raises for an image that cannot be processed (unreadable file, catalogue without
    the needed columns...): :func:`run` records those and goes on.
    """
    config = (config or FitConfig()).replace(**options) if options else (config or FitConfig())
    path = Path(path)
    out_dir = Path(out_dir)
    paths = output_paths(path, out_dir)
    clear_outputs(path, out_dir)
    token = uuid.uuid4().hex  # ties the summary to the table it describes
    stages = _Stages()

    exposure = read_exposure(
        path, mask=config.mask, bad_bits=config.bad_bits, hdu=config.hdu, gain=config.gain,
        read_noise=config.read_noise, saturation=config.saturation, zeropoint=config.zeropoint,
        pixel_scale=config.pixel_scale,
    )  # fmt: skip
    stages.done("read")
    background = estimate_background(exposure)  # detection, the measured noise model and its summary
    stars, source = _stars(exposure, config, background)
    stages.done("stars")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptySelectionWarning)
        selected, counts = select_stars(
            stars, exposure, mag_range=config.mag_range, isolation=config.isolation,
            isolation_px=config.isolation_px, edge=config.edge, stamp=config.stamp,
            core_radius=config.core_radius, min_snr=config.min_snr,
        )  # fmt: skip
    stages.done("select")

    psf = psf_stats = flux_scale = brighter_fatter = None
    history = None
    if len(selected):
        stamps = cut_stamps(exposure, np.asarray(selected["x_init"]), np.asarray(selected["y_init"]), config.stamp, background=background)
        noise, noise_desc = noise_model(exposure, stamps, background, mode=config.noise)
        stages.done("stamps")
        fit, psf, psf_stats = _fit(stamps, exposure, config, noise)
        fit["flags"] = np.asarray(fit["flags"]) | np.where(stamps.off_image, int(Flag.OFF_IMAGE), 0)
        history = fit.meta.pop("loss_history", None)
        fit.meta["psf"] = config.psf if psf is not None else "independent"
        if np.ndim(noise.get("read_noise")) == 1:  # the measured sky: each star's effective read noise [e-]
            fit["read_noise"] = np.asarray(noise["read_noise"], dtype=np.float64)
        psf, fit, brighter_fatter = _brighter_fatter(config, psf, fit, stamps, exposure, noise)
        if psf is not None:
            flux_scale = aperture_check(exposure.data, fit, psf.flux_radius, mask=exposure.mask,
                                        header_apcor=exposure.header.get("APCOR6"))
            psf.meta.update({k: v for k, v in flux_scale.items() if k in ("apcorr", "apcorr_err", "apcorr_n", "header_apcor")})
        stages.done("fit")
    else:
        msg = f"{path.name}: no star survived the selection ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        log.warning(msg)
        warnings.warn(msg, EmptySelectionWarning, stacklevel=2)
        fit, noise_desc = _empty_fit_table(config), {"model": None, "description": "no stars"}
    fit_meta = dict(fit.meta)

    table = Table()
    for name in ("id", "ra", "dec", "mag"):
        table[name] = selected[name] if name in selected.colnames else np.full(len(selected), np.nan)
    for name in fit.colnames:
        table[name] = fit[name]
        table[name].unit = fit[name].unit
    meta = dict(_metadata(exposure, config, noise_desc, source, fit_meta), run=token)
    outputs = {"stars": paths["stars"]}
    write_parquet(table, paths["stars"], meta)
    if history is not None:
        save_npy(history, paths["history"])
        outputs["history"] = paths["history"]
    if psf is not None:
        psf.write(paths["psf"], overwrite=True)
        outputs["psf"] = paths["psf"]
    stages.done("write")

    summary = {
        "image": str(path),
        "stem": stem_of(path),
        "status": "ok",
        "error": None,
        "counts": dict(counts),
        "selection_rules": selected.meta.get("rules"),
        **_summary_numbers(table, exposure),
        "model": config.model,
        "method": config.method,
        "psf": config.psf,
        "psf_stats": psf_stats,
        "flux_scale": flux_scale,
        "brighter_fatter": brighter_fatter,
        "noise": noise_desc,
        "exposure": exposure.summary(),
        "timings": stages.seconds,
        "outputs": outputs,
        "version": __version__,
        "run": token,
    }
    write_json(summary, paths["summary"])
    if config.report:
        from .report import write_report

        summary["outputs"]["report"] = write_report(out_dir, stem_of(path))
        write_json(summary, paths["summary"])
    log.info(
        "%s: %d stars fitted, %d with flags 0, median fwhm %s px (%.2f s)",
        path.name, summary["n_fitted"], summary["n_flags_zero"],
        None if summary["fwhm_median_px"] is None else round(summary["fwhm_median_px"], 3), sum(stages.seconds.values()),
    )  # fmt: skip
    return summary


def clear_outputs(path, out_dir):
    """Remove an image's outputs, summary first (its commit mark), and the temporary files
    an interrupted write left beside them."""
    paths = output_paths(path, out_dir)
    for kind in ("summary", "stars", "history", "psf", "report"):
        p = paths[kind]
        p.unlink(missing_ok=True)
        if p.parent.is_dir():
            for tmp in (*p.parent.glob(f".{p.name}.*.part"), *p.parent.glob(f"{p.name}.tmp")):
                tmp.unlink(missing_ok=True)


def is_done(path, out_dir):
    """True when an image's outputs are those of a successful earlier run: its summary says
    ok, every output it lists exists, and the stars table carries the summary's run token."""
    paths = output_paths(path, out_dir)
    try:
        summary = read_json(paths["summary"])
        listed = [paths["summary"].with_name(Path(p).name) for p in summary.get("outputs", {}).values()]
        if summary.get("status") != "ok" or not all(p.exists() for p in listed):
            return False
        meta = json.loads((pq.read_schema(paths["stars"]).metadata or {}).get(METADATA_KEY, b"{}"))
        return summary.get("run") is not None and meta.get("run") == summary["run"]
    except (OSError, ValueError, AttributeError, pa.ArrowException):
        return False


def _check_stems(paths):
    """The input paths without repeats of one file; ValueError when two different files
    share a stem (their outputs would overwrite each other)."""
    seen, unique = {}, []
    for p in paths:
        stem, real = stem_of(p), os.path.realpath(p)
        if stem in seen:
            if seen[stem][1] == real:
                log.warning("%s: given twice; processed once", p)
                continue
            raise ValueError(
                f"{seen[stem][0]} and {p} have the same name {stem!r}: their outputs would overwrite each other "
                "in one --out folder; rename one or run them into different folders"
            )
        seen[stem] = (p, real)
        unique.append(p)
    return unique


def _absolute(config):
    """The config with its catalogue and mask files as absolute paths (for the workers)."""
    changes = {}
    for name in ("catalog", "mask"):
        value = getattr(config, name)
        if value not in (None, "auto"):
            changes[name] = os.path.abspath(value)
    return config.replace(**changes) if changes else config


def _process_one(path, config, out_dir):
    """The per-file task of :func:`run` (module level: picklable for Dask)."""
    return process_image(path, config, out_dir)


def run(paths, config=None, out_dir=".", *, workers=None, scheduler=None):
    """Process many images (Dask unless one image or ``workers=1``); return the run summary.

    Images whose outputs exist are skipped unless ``config.overwrite``. A failing image is
    recorded with its reason (``run_summary.json``) and the others finish.
    """
    config = _absolute(config or FitConfig())
    out_dir = Path(os.path.abspath(out_dir))
    paths = _check_stems([str(p) for p in paths])
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"version": __version__, "options": config.to_dict(), "images": {}}
    todo = []
    for p in paths:
        if not config.overwrite and is_done(p, out_dir):
            log.info("%s: outputs exist, skipped (use --overwrite to redo)", p)
            record["images"][p] = {"status": "skipped", "error": None, "summary": str(output_paths(p, out_dir)["summary"])}
        else:
            todo.append(p)
    run_path = out_dir / "run_summary.json"
    for tmp in out_dir.glob(f".{run_path.name}.*.part"):  # left by a killed run
        tmp.unlink(missing_ok=True)

    def on_result(res):
        entry = {"status": "ok" if res.ok else "failed", "error": res.error, "seconds": round(res.seconds, 3)}
        if res.ok:
            entry["summary"] = str(output_paths(res.path, out_dir)["summary"])
            entry["n_fitted"] = res.value["n_fitted"]
        else:  # nothing of a failed image may look like a result
            clear_outputs(res.path, out_dir)
            write_json({"image": res.path, "stem": stem_of(res.path), "status": "failed", "error": res.error}, output_paths(res.path, out_dir)["summary"])
        record["images"][res.path] = entry
        write_json(record, run_path)

    t0 = time.perf_counter()
    task = functools.partial(_process_one, config=config, out_dir=str(out_dir))
    map_files(task, todo, workers=workers, scheduler=scheduler, desc="images", on_result=on_result)
    images = record["images"]
    record["n_ok"] = sum(e["status"] == "ok" for e in images.values())
    record["n_failed"] = sum(e["status"] == "failed" for e in images.values())
    record["n_skipped"] = sum(e["status"] == "skipped" for e in images.values())
    record["seconds"] = round(time.perf_counter() - t0, 3)
    write_json(record, run_path)
    return record
