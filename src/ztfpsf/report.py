"""One self-contained HTML report per image, from the run's outputs (never re-fitting).

The report holds the run's counts per selection cut, the PSF summary, timings, every
flag bit that occurs (decoded, with its meaning and count), the worst fits, and the
figures of :mod:`ztfpsf.plots` embedded as ``data:`` PNGs: one file that opens in any
browser without a server or network. matplotlib is imported only while figures are drawn.
When the folder holds ``<stem>.residual.fits`` (``ztfpsf catalog --residual-image``: the
image less every fitted source), a thumbnail of it beside the data, on one stretch
(:mod:`ztfpsf.plots.residual_image`), is among the figures.

    from ztfpsf.report import write_report
    write_report("out/", "ztf_20200924431759_000655_zr_c13_o_q3_sciimg")  # -> out/<stem>.report.html
"""

import base64
import datetime
import html
import json
import logging
from pathlib import Path

import numpy as np

from .io.results import atomic_write, result_paths
from . import __version__
from .flags import BAD, Flag, decode, meaning
from .plots import _data

log = logging.getLogger(__name__)

__all__ = ["write_report", "write_reports", "render_report", "find_stems"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1700px;
color:#1d2330;background:#fff;padding:0 1.2em}
h1{font-size:1.45em;margin-bottom:.2em}h2{font-size:1.15em;border-bottom:2px solid #d6dbe6;padding-bottom:.2em;
margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0 .8em 0;font-size:.9em}
th,td{border:1px solid #d6dbe6;padding:.25em .6em;text-align:right}th{background:#eef1f7}
td.l,th.l{text-align:left}code{background:#f3f4f8;padding:0 .25em}
.grid{display:flex;flex-wrap:wrap;gap:0 2.5em;align-items:flex-start}
.status{display:inline-block;padding:.15em .6em;border-radius:.3em;color:#fff;font-weight:bold}
.ok{background:#2e8540}.failed{background:#c0392b}.note{color:#5a6272}
img{max-width:100%;height:auto;border:1px solid #e3e6ee;margin:.3em 0}
"""


def find_stems(out_dir):
    """Stems of the images with outputs in ``out_dir`` (a summary or a results file)."""
    out_dir = Path(out_dir)
    stems = {p.name[: -len(".summary.json")] for p in out_dir.glob("*.summary.json")}
    stems |= {p.name[: -len(".stars.parquet")] for p in out_dir.glob("*.stars.parquet")}
    return sorted(stems)


def _read_summary(path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


# ---------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------
def _e(value):
    return html.escape(str(value))


def _num(value, digits=4):
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "–" if not np.isfinite(v) else f"{v:.{digits}g}"


def _table(header, rows, left=(0,)):
    cls = lambda k: ' class="l"' if k in left else ""
    head = "".join(f"<th{cls(k)}>{_e(h)}</th>" for k, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(k)}>{c}</td>" for k, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _kv(pairs):
    return _table(("quantity", "value"), [(_e(k), v) for k, v in pairs])


def _img(png, alt):
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _figure_pngs(run, worst, typical, residual=None):
    """``[(title, png bytes)]`` of every figure the run allows (a failing figure is noted,
    not fatal); ``residual``: path of the run's residual image, drawn when given."""
    from .plots import _style
    from .plots.loss import compute_loss, plot_loss
    from .plots.maps import compute_maps, plot_maps
    from .plots.residuals import compute_residuals, plot_residuals
    from .plots.stars import compute_stars, plot_star, select_stars

    out, problems = [], []

    def add(title, draw):
        try:
            fig = draw()
            out.append((title, _style.png_bytes(fig)))
        except Exception as err:  # noqa: BLE001 - one figure must not lose the report
            log.warning("report figure %r not drawn: %s", title, err)
            problems.append(f"{title}: {type(err).__name__}: {err}")

    t = run.table
    add("PSF over the image", lambda: plot_maps(compute_maps(t, run.psf_model)))
    if run.psf_model is not None:
        from .plots.psf import compute_psf, plot_psf

        add("PSF model and its residual surface",
            lambda: plot_psf(compute_psf(run.psf_model, run.psf_model.meta.get("reserve_by_snr"))))
    if run.psf_model is not None:
        from .plots.brighter_fatter import compute_brighter_fatter, plot_brighter_fatter

        add("brighter-fatter: size and PSF - aperture against flux",
            lambda: plot_brighter_fatter(compute_brighter_fatter(t, run.psf_model, run.image, run.mask)))
    add("fit quality", lambda: plot_residuals(compute_residuals(t, run.image, run.mask, psf=run.psf_model)))
    if run.history is not None:
        dof = t["dof"] if "dof" in t.colnames else None
        add("loss curves", lambda: plot_loss(compute_loss({t.meta.get("method", "fit"): run.history}, dof=dof)))
    if residual is not None:
        add(RESIDUAL_TITLE, lambda: _residual_figure(residual, run.image))
    if run.image is not None:
        rows = select_stars(t, worst=worst, typical=typical)
        for star in compute_stars(t, run.image, rows, mask=run.mask, psf=run.psf_model):
            add(f"{star['reason']} star {star['id']}", lambda s=star: plot_star(s))
    else:
        problems.append(f"per-star figures: {run.image_error}")
    return out, problems


#: Title of the residual image's thumbnail in the report.
RESIDUAL_TITLE = "residual image (ztfpsf catalog): data and data - fitted sources"


def _residual_figure(path, image):
    """The residual image thumbnail figure from the FITS file ``path`` (the data beside it
    when the run's image is at hand)."""
    from .plots._data import read_image
    from .plots.residual_image import compute_residual_image, plot_residual_image

    return plot_residual_image(compute_residual_image(read_image(path), image))


def _counts_section(summary, table):
    rows = []
    counts = (summary or {}).get("counts") or {}
    for cut, n in counts.items():
        rows.append((_e(cut), _num(n)))
    for key in ("n_fitted", "n_converged", "n_flagged"):
        if summary and key in summary:
            rows.append((f"<b>{_e(key)}</b>", _num(summary[key])))
    if table is not None:
        flags = np.asarray(table["flags"], np.int64)
        rows.append(("rows in the results table", _num(len(table))))
        rows.append(("rows with flags = 0", _num(int(np.sum(flags == 0)))))
        rows.append((f"rows without values ({', '.join(decode(BAD))})", _num(int(np.sum((flags & int(BAD)) != 0)))))
    return "<h2>Counts</h2>" + (_table(("stage", "stars"), rows) if rows else '<p class="note">no counts</p>')


def _percentiles(values):
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "–"
    p16, p50, p84 = np.percentile(v, [16, 50, 84])
    return f"{p50:.4g} <span class=note>({p16:.4g} – {p84:.4g})</span>"


def _psf_section(summary, table):
    from .plots.maps import independent_shapes, star_ellipticity

    pairs = []
    s = summary or {}
    for key, label in (("fwhm_median_px", "median fwhm [px]"), ("fwhm_median_arcsec", "median fwhm [arcsec]"),
                       ("alpha_median", "median alpha")):
        if key in s:
            pairs.append((label, _num(s[key])))
    if table is not None:
        stars = independent_shapes(table)  # each star's own fit, also after a joint PSF fit
        ok = _data.fitted_rows(stars)
        pairs.append(("fwhm [px] of fitted stars: median (16 – 84 %)", _percentiles(np.asarray(stars["fwhm"], float)[ok])))
        if "alpha" in stars.colnames:
            pairs.append(("alpha: median (16 – 84 %)", _percentiles(np.asarray(stars["alpha"], float)[ok])))
        ell = star_ellipticity(stars)
        if ell is not None:
            pairs.append(("|e|: median (16 – 84 %)", _percentiles(np.hypot(*ell)[ok])))
        ok = _data.fitted_rows(table)
        pairs.append(("chi2/dof: median (16 – 84 %)", _percentiles(_data.chi2_per_dof(table)[ok])))
    html_ = "<h2>PSF summary</h2>" + _kv(pairs)
    stats = s.get("psf_stats") or {}
    if stats.get("reserve_by_snr"):
        rows = [(_e(k), _num(v.get("chi2_dof")), _num(v.get("n"))) for k, v in stats["reserve_by_snr"].items()]
        html_ += (f"<h3>Reserve stars by S/N ({'hybrid' if stats.get('hybrid') else 'analytic'} PSF; "
                  f"train chi2/dof {_num(stats.get('chi2_dof_train'))}, reserve {_num(stats.get('chi2_dof_reserve'))})</h3>"
                  + _table(("S/N", "chi2/dof", "stars"), rows))
    scale = s.get("flux_scale") or {}
    if scale.get("apcorr") is not None:
        html_ += "<h3>Flux scale</h3>" + _kv([
            (f"PSF - {2 * scale['radius']:g} px aperture mag, bright stars (median ± error)",
             f"{scale['apcorr']:+.4f} ± {scale['apcorr_err']:.4f} ({scale['apcorr_n']} stars)"),
            ("its slope against magnitude [mag/mag]", f"{scale['apcorr_slope']:+.4f} ± {scale['apcorr_slope_err']:.4f}"),
            ("header APCOR6", _num(scale.get("header_apcor")))])
    return html_ + _brighter_fatter_section(s.get("brighter_fatter") or {})


def _brighter_fatter_section(info):
    """The summary's brighter-fatter numbers (:mod:`ztfpsf.psf.brighter_fatter`)."""
    if info.get("size_slope") is None:
        return ""
    pm = lambda v, e, k, unit: "–" if v is None else f"{k * v:+.3f} ± {k * (e or float('nan')):.3f} {unit}"
    model = info.get("model") or {}
    pairs = [(f"size slope ({_e(info.get('size_measure'))}), {info.get('size_n')} stars",
              pm(info["size_slope"], info.get("size_slope_err"), 100, "% per decade of flux")),
             ("PSF - aperture slope", pm(info.get("apcorr_slope"), info.get("apcorr_slope_err"), 1e3, "mmag/mag")),
             (f"flux-dependent PSF (--brighter-fatter {_e(info.get('mode'))})",
              pm(model.get("slope"), model.get("slope_err"), 100, "% per decade") if model else "off")]
    if info.get("after"):
        pairs.append(("PSF - aperture slope with it", pm(info["after"].get("apcorr_slope"), info["after"].get("apcorr_slope_err"), 1e3, "mmag/mag")))
    return "<h3>Brighter-fatter</h3>" + _kv(pairs)


def _run_section(summary, meta):
    keys = ("model", "integration", "method", "stamp_size", "gain", "read_noise", "saturation", "zeropoint",
            "pixel_scale", "image_shape", "mask", "version")
    pairs = [(k, _e(meta[k]) if isinstance(meta.get(k), (str, list)) else _num(meta.get(k))) for k in keys if k in meta]
    if not pairs and summary:
        pairs = [(k, _e(summary[k])) for k in ("model", "method") if k in summary]
    opts = meta.get("options")
    if opts:
        pairs.append(("options", f"<code>{_e(json.dumps(opts, default=str))}</code>"))
    timings = (summary or {}).get("timings") or {}
    html_ = "<h2>Run</h2>" + (_kv(pairs) if pairs else '<p class="note">no metadata</p>')
    if timings:
        rows = [(_e(k), _num(v, 3)) for k, v in timings.items()]
        rows.append(("<b>total</b>", _num(sum(float(v) for v in timings.values()), 3)))
        html_ += "<h2>Timings [s]</h2>" + _table(("stage", "seconds"), rows)
    return html_


def _flags_section(table):
    flags = np.asarray(table["flags"], np.int64)
    rows = []
    for f in Flag:
        n = int(np.sum((flags & int(f)) != 0))
        if n:
            rows.append((f"<code>{_e(f.name)}</code>", _num(int(f)), _num(n), _e(meaning(f))))
    if not rows:
        return "<h2>Flags</h2><p>No star has a flag set.</p>"
    return "<h2>Flags</h2>" + _table(("flag", "value", "stars", "meaning"), rows, left=(0, 3))


def _worst_section(table, n):
    rchi2 = _data.chi2_per_dof(table)
    ok = np.nonzero(_data.fitted_rows(table) & np.isfinite(rchi2))[0]
    order = ok[np.argsort(-rchi2[ok], kind="stable")][:n]
    cols = [c for c in ("id", "x", "y", "mag", "flux", "fwhm", "alpha", "e1", "e2") if c in table.colnames]
    header = cols + ["chi2/dof", "flags"]

    def cell(c, i):
        v = table[c][i]
        if c in ("flux", "fwhm", "alpha") and f"{c}_err" in table.colnames:
            return f"{_num(v)} ± {_num(table[c + '_err'][i], 2)}"
        return _e(v) if c == "id" else _num(v, 6 if c in ("x", "y") else 4)

    rows = [[cell(c, i) for c in cols] + [_num(rchi2[i]), _e("|".join(decode(table["flags"][i])) or "0")] for i in order]
    html_ = f"<h2>Worst fits (largest chi2/dof of {ok.size} fitted stars)</h2>"
    html_ += _table(header, rows, left=(len(header) - 1,)) if rows else '<p class="note">no fitted star</p>'
    bad = np.nonzero((np.asarray(table["flags"], np.int64) & int(BAD)) != 0)[0]
    if bad.size:
        items = ", ".join(
            f"{_e(table['id'][i]) if 'id' in table.colnames else i} (<code>{_e('|'.join(decode(table['flags'][i])))}</code>)"
            for i in bad[:20]
        )
        more = f" and {bad.size - 20} more" if bad.size > 20 else ""
        html_ += f"<p>{bad.size} star{'s' if bad.size > 1 else ''} without values: {items}{more}.</p>"
    return html_


def render_report(summary, run=None, *, worst=5, typical=2, figures=True, residual=None):
    """The report as one HTML string. ``summary``: the summary dict (or None);
    ``run``: a :class:`ztfpsf.plots.make.Run` (or None when the run failed before results);
    ``residual``: path of the residual image (``<stem>.residual.fits``), shown as a thumbnail."""
    table = run.table if run is not None else None
    meta = dict(table.meta) if table is not None else {}
    meta.pop("loss_history", None)
    s = summary or {}
    stem = s.get("stem") or (run.stem if run is not None else "ztfpsf")
    status = s.get("status", "ok" if table is not None else "failed")
    parts = [
        f"<h1>ztfpsf report: {_e(stem)}</h1>",
        (
            f'<p><span class="status {"ok" if status == "ok" else "failed"}">{_e(status)}</span> '
            f"image <code>{_e(s.get('image') or meta.get('image', '?'))}</code></p>"
        ),
    ]
    if s.get("error"):
        parts.append(f"<h2>Error</h2><pre>{_e(s['error'])}</pre>")
    boxes = [_counts_section(s, table)]
    if table is not None:
        boxes.append(_psf_section(s, table))
    boxes.append(_run_section(s, meta))
    parts.append('<div class="grid">' + "".join(f"<section>{b}</section>" for b in boxes) + "</div>")
    if table is not None:
        parts.append(_flags_section(table))
        parts.append(_worst_section(table, worst))
        if figures:
            pngs, problems = _figure_pngs(run, worst, typical, residual)
            parts.append("<h2>Figures</h2>")
            parts += [f"<h3>{_e(title)}</h3>{_img(png, title)}" for title, png in pngs]
            if problems:
                parts.append('<p class="note">not drawn: ' + "; ".join(_e(p) for p in problems) + "</p>")
    outputs = s.get("outputs") or {}
    if outputs:
        rows = [(_e(k), f"<code>{_e(v)}</code>") for k, v in outputs.items()]
        parts.append("<h2>Outputs</h2>" + _table(("output", "path"), rows, left=(0, 1)))
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    parts.append(f'<p class="note">ztfpsf {__version__}, {now}. Pixel coordinates are 0-based, pixel centres at integers.</p>')
    title = f"ztfpsf report: {_e(stem)}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
        f"<body>{''.join(parts)}</body></html>\n"
    )


def write_report(out_dir, stem, *, image=None, psf=None, worst=5, typical=2, path=None, figures=True):
    """Write ``<out_dir>/<stem>.report.html`` from the image's outputs and return its path.

    Reads ``<stem>.summary.json`` and ``<stem>.stars.parquet`` (either may be missing, not
    both), the image (``image`` or the path in the metadata) for the per-star and
    residual figures, ``<stem>.history.npy`` for the loss curves, ``<stem>.psf.fits``
    for the model maps and ``<stem>.residual.fits`` (``ztfpsf catalog --residual-image``)
    for the residual image's thumbnail when they exist. ``worst`` / ``typical``: number of worst and
    typical stars shown. Raises FileNotFoundError when neither output exists.
    """
    from .plots.make import load_run

    paths = result_paths(out_dir, stem)
    summary = _read_summary(paths["summary"])
    if summary is None and not paths["stars"].is_file():
        raise FileNotFoundError(f"{out_dir}: no {paths['summary'].name} or {paths['stars'].name}")
    run = None
    if paths["stars"].is_file():
        run = load_run(paths["stars"], image=image, psf=psf)
    out = Path(path) if path is not None else paths["report"]
    residual = paths["residual"] if paths["residual"].is_file() else None
    text = render_report(summary, run, worst=worst, typical=typical, figures=figures, residual=residual)
    atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))  # a reader never sees half a report
    log.info("report: %s", out)
    return out


def write_reports(out_dir, stems=None, **kwargs):
    """A report for every image with outputs in ``out_dir`` (or the given stems).

    Returns ``[(stem, path or None, error or None)]``; one image's failure does not stop
    the others.
    """
    from tqdm.auto import tqdm

    stems = find_stems(out_dir) if stems is None else list(stems)
    done = []
    for stem in tqdm(stems, desc="reports", unit="image", disable=len(stems) < 3, leave=False):
        try:
            done.append((stem, write_report(out_dir, stem, **kwargs), None))
        except (OSError, ValueError) as err:
            log.error("report for %s not written: %s", stem, err)
            done.append((stem, None, str(err)))
    return done
