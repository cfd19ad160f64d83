"""Options of the alert measurement and the ZTF constants it needs."""

from dataclasses import dataclass

from ..io.alerts import CUTOUT_SIZE

#: ZTF's nominal gain [e-/ADU] (the cutouts' headers carry none).
ZTF_GAIN = 6.2
#: Frames in a ZTF reference co-add when the packet does not say (``nframesref``).
DEFAULT_NFRAMESREF = 15


@dataclass(frozen=True)
class AlertPSFConfig:
    """Options of the alert measurement (defaults measured on 240 public ZTF alerts).

    gain : e-/ADU for the sources' Poisson noise (ZTF nominal 6.2).
    star_size, stamp_size : odd sizes [px] of the science star stamps and of the
        difference stamp around the candidate.
    detect_snr : peaks of the smoothed science cutout above this S/N are sources (and
        neighbours to mask).
    min_star_snr : stars at least this bright are fitted for the PSF fwhm.
    shape_snr, max_alpha_rel_err : stars at least this bright whose alpha is known to
        this fraction of (alpha - 1) give the full shape (fwhm and alpha).
    alpha_range, fwhm_range : physical bounds of a PSF star's shape; alpha above the
        range (a Gaussian-like profile) is capped at its upper end.
    default_alpha : alpha when no well-measured star is known at all.
    max_shift : flag ``CENTER_SHIFT`` if the fitted candidate moved more than this [px]
        from the packet's position.
    max_chi2 : flag a forced fit whose chi2/dof exceeds ``max_chi2`` (times
        ``1 + (snr/chi2_snr_scale)**2``, room for the Moffat's imperfect match of
        bright stars) as a poor fit.
    mask_radius : masked pixels within this many FWHM of the candidate flag
        ``MASKED_PIXELS`` (farther ones only cost background pixels).
    group_keys : candidate fields whose equal values share the PSF alpha (in this order).
    max_iter : Levenberg-Marquardt iterations of the forced fits (their chi2 surface is
        flat along the position at low S/N: 30 sometimes stops short).
    method, dtype : of every fit (:func:`ztfpsf.fit_stamps`).

    The last four switch the method's choices off, to measure what each is worth
    (``benchmarks/validate_alerts.py --ablations``): ``star_cutout='template'`` takes
    the stars of the template cutout; ``fit_position=False`` holds the candidate at the
    packet's position; ``source_noise=False`` keeps only the sky variance;
    ``free_shape=True`` fits the shape of the candidate itself (no stars).
    """

    gain: float = ZTF_GAIN
    star_size: int = 17
    stamp_size: int = 21
    detect_snr: float = 5.0
    min_star_snr: float = 10.0
    shape_snr: float = 50.0
    max_alpha_rel_err: float = 0.3
    alpha_range: tuple = (1.5, 20.0)
    fwhm_range: tuple = (0.8, 12.0)
    default_alpha: float = 3.0
    max_shift: float = 1.0
    max_chi2: float = 3.0
    chi2_snr_scale: float = 50.0
    mask_radius: float = 2.0
    group_keys: tuple = ("pid", "jd", "nid")
    max_iter: int = 150
    method: str = "lm"
    dtype: str = "float64"
    star_cutout: str = "science"
    fit_position: bool = True
    source_noise: bool = True
    free_shape: bool = False

    def __post_init__(self):
        if self.star_cutout not in ("science", "template"):
            raise ValueError(f"star_cutout must be 'science' or 'template'; got {self.star_cutout!r}")
        if not self.gain > 0:
            raise ValueError(f"gain must be > 0 e-/ADU; got {self.gain}")
        if self.stamp_size % 2 == 0 or self.star_size % 2 == 0 or min(self.stamp_size, self.star_size) < 7:
            raise ValueError("stamp_size and star_size must be odd and >= 7")
        if max(self.stamp_size, self.star_size) > CUTOUT_SIZE:
            raise ValueError(f"stamp_size and star_size must be <= {CUTOUT_SIZE} (the cutout)")
