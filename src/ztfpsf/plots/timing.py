"""Timing figure from benchmark JSON files: wall time and stars/s against the number of
stars, for each method and backend (the ZTF study's Figures 10 and 16, regenerated).

A benchmark file is ``{"machine", "device", "rows": [{"method", "backend", "dtype",
"model", "n", "seconds", "stars_per_s"}, ...]}``; several files (e.g. a CPU and a GPU
machine) are drawn in one figure. Repeated measurements of the same series and ``n`` are
averaged, their scatter drawn as error bars.
"""

import json
from pathlib import Path

import numpy as np

from . import _style

__all__ = ["read_timings", "compute_timing", "plot_timing"]

_REQUIRED = ("method", "backend", "n", "seconds")


def read_timings(paths):
    """Rows of one or more benchmark JSON files, each with the file's ``machine`` and ``device``.

    Raises ValueError naming the file when it is not a benchmark file.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows = []
    for path in paths:
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such benchmark file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a JSON file ({err})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
            raise ValueError(f"{path}: not a benchmark timings file (no 'rows' list)")
        for k, row in enumerate(doc["rows"]):
            missing = [key for key in _REQUIRED if key not in row]
            if missing:
                raise ValueError(f"{path}: row {k} lacks {', '.join(missing)}")
            rows.append({**row, "machine": doc.get("machine", ""), "device": doc.get("device", ""), "file": str(path)})
    return rows


def _label(row, with_device):
    label = f"{row['method']} {row['backend']} {row.get('dtype', '')}".strip()
    return f"{label} [{row['device']}]" if with_device and row.get("device") else label


def compute_timing(rows):
    """Series of the timing figure.

    Returns ``{"series": {label: {"n", "seconds", "seconds_std", "stars_per_s",
    "repeats"}}, "bar_n": int or None, "bar": {label: seconds}}``: per series (method,
    backend, dtype, and device when the rows come from several devices) the mean over
    repeats at each ``n``; the bar chart compares every series at the largest ``n`` that
    all of them measured (or each at its own largest ``n`` when there is none in common).
    """
    with_device = len({r.get("device", "") for r in rows}) > 1
    groups = {}
    for r in rows:
        groups.setdefault(_label(r, with_device), {}).setdefault(int(r["n"]), []).append(r)
    series = {}
    for label, by_n in groups.items():
        ns = np.array(sorted(by_n))
        sec = [np.array([float(r["seconds"]) for r in by_n[n]]) for n in ns]
        sps = [np.array([float(r.get("stars_per_s", n / float(r["seconds"]))) for r in by_n[n]]) for n in ns]
        series[label] = {
            "n": ns,
            "seconds": np.array([s.mean() for s in sec]),
            "seconds_std": np.array([s.std() for s in sec]),
            "stars_per_s": np.array([s.mean() for s in sps]),
            "repeats": np.array([s.size for s in sec]),
        }
    common = set.intersection(*(set(s["n"].tolist()) for s in series.values())) if series else set()
    bar_n = max(common) if common else None
    bar = {}
    for label, s in series.items():
        k = int(np.nonzero(s["n"] == bar_n)[0][0]) if bar_n is not None else -1
        bar[label] = (int(s["n"][k]), float(s["seconds"][k]))
    return {"series": series, "bar_n": bar_n, "bar": bar, "devices": sorted({r.get("device", "") for r in rows})}


def plot_timing(values, path=None):
    """Draw :func:`compute_timing` values; save when ``path`` is given. Returns the Figure.

    Left: wall time against the number of stars (log-log). Middle: stars per second.
    Right: wall time of every series for one number of stars (bars).
    """
    fig = _style.new_figure("timing")
    ax_t, ax_r, ax_b = fig.subplots(1, 3, width_ratios=[1, 1, 1.1])
    for k, (label, s) in enumerate(values["series"].items()):
        colour = f"C{k % 10}"
        fmt = "s--" if "gpu" in label.lower() else "o-"  # accelerator series dashed: colours repeat after 10
        ax_t.errorbar(s["n"], s["seconds"], yerr=s["seconds_std"] if np.any(s["repeats"] > 1) else None,
                      fmt=fmt, ms=4, color=colour, label=label)
        ax_r.plot(s["n"], s["stars_per_s"], fmt, ms=4, color=colour, label=label)
    for ax, ylabel, title in ((ax_t, "wall time [s]", "wall time"), (ax_r, "stars / s", "throughput")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of stars")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    labels = list(values["bar"])
    if labels:
        secs = [values["bar"][lb][1] for lb in labels]
        y = np.arange(len(labels))
        ax_b.barh(y, secs, color=[f"C{k % 10}" for k in range(len(labels))])
        ax_b.set_yticks(y, [f"{lb} (n={values['bar'][lb][0]})" if values["bar_n"] is None else lb for lb in labels],
                        fontsize=8)
        ax_b.invert_yaxis()
        ax_b.set_xscale("log")
        ax_b.set_xlabel("wall time [s]")
        n = values["bar_n"]
        ax_b.set_title(f"{n} stars" if n is not None else "largest n of each series", fontsize=10)
        for yi, sec in zip(y, secs):
            ax_b.text(sec, yi, f" {sec:.3g} s", va="center", fontsize=8)
    else:
        _style.note(ax_b, "no timings")
    devices = ", ".join(d for d in values.get("devices", []) if d)
    if devices:
        fig.suptitle(devices, fontsize=9)
    if path is not None:
        _style.save(fig, path)
    return fig
