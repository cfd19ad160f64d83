"""Figures an astronomer looks at, drawn from a run's outputs without re-fitting.

Every figure has a ``compute_*`` function that returns the plotted values (numpy, no
matplotlib) and a ``plot_*`` function that draws them on a headless figure of fixed size
(:data:`FIGSIZE` inches at :data:`DPI`) and saves it when given a path. matplotlib is
imported only inside the ``plot_*`` functions.

- per star (:mod:`.stars`): data, model, residual on one colour scale, residual/sigma,
  3-D view with the model as a wireframe;
- over the image (:mod:`.maps`): fwhm, alpha and ellipticity whiskers from the star fits
  and from a spatially varying PSF model;
- fit quality (:mod:`.residuals`): mean normalised residual of all stars, chi2/dof
  histogram, magnitude residuals against the catalogue;
- loss curves (:mod:`.loss`), log-log; timing curves from benchmark files (:mod:`.timing`).

:func:`make_figures` draws them all from a ``<stem>.stars.parquet`` file.
"""

from ._data import read_image, read_results
from ._style import DPI, FIGSIZE, pixel_size
from .loss import compute_loss, plot_loss, total_loss
from .make import KINDS, load_run, make_figures, make_timing_figure
from .maps import compute_maps, plot_maps
from .residuals import compute_residuals, plot_residuals
from .stars import compute_stars, plot_star, plot_stars, select_stars
from .timing import compute_timing, plot_timing, read_timings

__all__ = [
    "DPI",
    "FIGSIZE",
    "KINDS",
    "pixel_size",
    "read_results",
    "read_image",
    "load_run",
    "make_figures",
    "make_timing_figure",
    "select_stars",
    "compute_stars",
    "plot_star",
    "plot_stars",
    "compute_maps",
    "plot_maps",
    "compute_residuals",
    "plot_residuals",
    "total_loss",
    "compute_loss",
    "plot_loss",
    "read_timings",
    "compute_timing",
    "plot_timing",
]
