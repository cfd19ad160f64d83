"""Figure creation and saving, headless.

Figures are plain :class:`matplotlib.figure.Figure` objects drawn on the Agg canvas: no
pyplot, no global state and no display, so they work on servers, in Dask workers and in
threads. matplotlib is imported here, inside the functions, and only when a figure is
drawn. Every kind of figure has a fixed size in inches and :data:`DPI`, so a PNG's pixel
size is known in advance (``FIGSIZE[kind] * DPI``).
"""

import io
from pathlib import Path

#: Dots per inch of every saved figure.
DPI = 100

#: Figure size in inches of each kind of figure (width, height).
FIGSIZE = {
    "star": (16.0, 3.4),
    "maps": (13.0, 4.2),
    "maps_model": (13.0, 8.0),
    "residuals": (14.0, 4.2),
    "loss": (12.0, 4.2),
    "timing": (15.0, 4.4),
    "psf": (15.0, 4.4),
    "psf_flux": (19.0, 4.4),  # with the residual surface's flux term: one panel more
    "brighter_fatter": (13.0, 4.6),
    "residual_image": (9.0, 4.6),
}

#: Colour maps: sequential for images and maps, diverging for signed residuals.
CMAP = "viridis"
CMAP_SIGNED = "RdBu_r"


def pixel_size(kind):
    """(width, height) in pixels of a saved figure of ``kind``."""
    w, h = FIGSIZE[kind]
    return int(round(w * DPI)), int(round(h * DPI))


def new_figure(kind, layout="constrained"):
    """An empty figure of the size of ``kind``, on the Agg canvas.

    ``layout=None`` for figures that place their axes themselves (constrained layout
    costs about a second per figure with many axes; the per-star figures are many).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE[kind], dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path):
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default) and return the path."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    # no bbox_inches="tight": it would change the pixel size promised by FIGSIZE
    fig.savefig(path, dpi=DPI)
    return path


def png_bytes(fig):
    """The figure as PNG bytes (for embedding in the HTML report)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def note(ax, text):
    """Replace an empty panel by a centred explanation of why it is empty."""
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, color="0.35")
