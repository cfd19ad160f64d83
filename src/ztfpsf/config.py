"""One frozen set of options drives a run; its defaults are the ZTF study's."""

from dataclasses import asdict, dataclass, field, replace

from .io.ztf import DEFAULT_BAD_BITS

__all__ = ["FitConfig", "HYBRID_MIN_STARS"]

#: ``psf_model='auto'`` fits the hybrid PSF from this many selected stars on: its residual
#: surface has ~1,000 nodes, which fewer stars would leave to the priors.
HYBRID_MIN_STARS = 50


@dataclass(frozen=True)
class FitConfig:
    """Options of ``ztfpsf fit`` / :func:`ztfpsf.pipeline.process_image`.

    Inputs: ``catalog`` (a file used for every image; ``"auto"``: the
    ``<name>_catalog.{csv,ecsv,fits,parquet}`` beside each image; None: detect stars),
    ``mask`` ('auto': the ZTF mskimg beside a sciimg), ``bad_bits``, header overrides
    (``gain`` e-/ADU, ``read_noise`` e-, ``saturation`` ADU, ``zeropoint`` mag,
    ``pixel_scale`` arcsec/px). Selection: ``mag_range``, ``isolation`` (arcsec) or
    ``isolation_px``, ``edge`` and ``stamp`` (px), ``core_radius`` (px), ``min_snr``.
    Fit: ``model``, ``method``, ``dtype``, ``backend``, ``psf`` ('independent', 'shared',
    'varying'), ``degree``, ``psf_model`` (with a shared or varying PSF: 'analytic', 'hybrid'
    (analytic + pixel residual surface, :mod:`ztfpsf.psf.residual`) or 'auto': hybrid when
    at least ``HYBRID_MIN_STARS`` stars were selected), ``residual_flux`` (a hybrid PSF's
    surface gets a term linear in log flux: ZTF's cores change with the flux;
    :func:`ztfpsf.psf.fit_psf`), ``reserve``, ``noise`` ('measured': sky variance from the
    measured background rms; 'header': gain and read noise only; see
    :func:`ztfpsf.stamps.noise_model`), ``brighter_fatter`` ('auto': a flux-dependent PSF size
    when the stars' size-flux slope is beyond 3 sigma; 'on'; 'off': the diagnostic only;
    :mod:`ztfpsf.psf.brighter_fatter`). Output: ``overwrite``, ``history``, ``report``.
    """

    catalog: str | None = None
    catalog_positions: str = "auto"
    catalog_origin: int | None = None
    mask: str | None = "auto"
    bad_bits: tuple = DEFAULT_BAD_BITS
    hdu: int | str | None = None
    gain: float | None = None
    read_noise: float | None = None
    saturation: float | None = None
    zeropoint: float | None = None
    pixel_scale: float | None = None
    mag_range: tuple = (14.0, 18.0)
    isolation: float = 20.0
    isolation_px: float | None = None
    edge: int = 15
    stamp: int = 17
    core_radius: float = 3.0
    min_snr: float = 20.0
    model: str = "moffat"
    method: str = "lm"
    dtype: str = "float32"
    backend: str = "auto"
    psf: str = "independent"
    degree: int = 2
    psf_model: str = "auto"
    residual_flux: bool = True
    reserve: float = 0.1
    brighter_fatter: str = "off"
    seed: int = 0
    noise: str = "measured"
    overwrite: bool = False
    history: bool = False
    report: bool = False
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.psf not in ("independent", "shared", "varying"):
            raise ValueError(f"psf must be 'independent', 'shared' or 'varying'; got {self.psf!r}")
        if self.psf_model not in ("auto", "analytic", "hybrid"):
            raise ValueError(f"psf_model must be 'auto', 'analytic' or 'hybrid'; got {self.psf_model!r}")
        if self.brighter_fatter not in ("auto", "on", "off"):
            raise ValueError(f"brighter_fatter must be 'auto', 'on' or 'off'; got {self.brighter_fatter!r}")
        if self.noise not in ("measured", "header"):
            raise ValueError(f"noise must be 'measured' or 'header'; got {self.noise!r}")
        if self.stamp < 5 or self.stamp % 2 == 0:
            raise ValueError(f"stamp must be an odd number of pixels >= 5; got {self.stamp}")
        lo, hi = self.mag_range
        if not lo < hi:
            raise ValueError(f"mag_range must be (bright, faint) with bright < faint; got {self.mag_range}")

    def to_dict(self):
        d = asdict(self)
        d.pop("extra")
        return d

    def replace(self, **changes):
        return replace(self, **changes)
