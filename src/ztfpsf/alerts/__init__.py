"""PSF photometry of ZTF alert candidates, with a PSF shape measured on stars, at broker scale.

Every alert carries a 63x63 science, template and difference cutout centred on the
candidate. The candidate is measured on the difference cutout by a forced PSF fit
(``fit_stamps`` with the shape held fixed; flux, background and a sub-pixel position
free) with a pixel-integrated Moffat whose shape comes from *stars of the science
cutout*, never from the candidate alone: fitting the shape and the flux of a faint
candidate together is degenerate (alpha trades with flux by tenths of a magnitude).

Why the science cutout: the difference image is science minus (PSF-matched) reference
on the science image's PSF, so the science image's stars are the PSF the candidate
has. The template is a deep co-add with its own, usually sharper, PSF (on these alerts
its stars are 0.78x the science FWHM): it is not the difference's PSF.

The PSF of each alert (``psf_source``):

``local``
    the science cutout has well-measured stars (detection S/N >= ``shape_snr``, alpha
    determined to 30 %): weighted median (weights 1/fwhm_err**2) of their free-shape
    Moffat ``fwhm`` and ``alpha``. The candidate's own star is one of them when it is
    point-like, the best PSF star there is (same position, same exposure).
``local_fwhm``
    only fainter stars (S/N >= ``min_star_snr``): alpha is badly determined at low S/N
    (it trades with fwhm), so alpha is taken from the well-measured stars of the same
    readout-channel image (``pid``), else the same exposure (``jd``), else the same
    night (``nid``), else all alerts measured together, else ``default_alpha``; the
    stars are refitted with that alpha and the fwhm is their weighted median.
``quadrant``
    no usable star in the cutout: the PSF of the other alerts of the same
    readout-channel image (``pid``): same exposure, same CCD quadrant.
``exposure``, ``night``, ``batch``
    the PSF of the same exposure on other CCDs (``jd``), else of the night (``nid``),
    else of every alert measured together. The PSF varies over the focal plane, so it is
    checked on the candidate: its fwhm is fitted (alpha fixed) on the difference, and
    unless that is measured to 15 % and agrees within 3 sigma the alert is flagged
    ``SHAPE_UNTRUSTED`` (the borrowed PSF is still used).
``difference``
    nothing else: the candidate's own fwhm (alpha ``default_alpha``), ``SHAPE_UNTRUSTED``.

Flags: the forced fit's (``BAD`` bits: NaN values); ``MASKED_PIXELS`` only for masked
pixels within ``mask_radius`` FWHM of the candidate; ``OFF_IMAGE`` when the difference
stamp reaches beyond a (cut-short) cutout; ``CENTER_SHIFT`` beyond ``max_shift``;
``POOR_FIT`` for a poor fit (chi2/dof too high: a dipole, a bad subtraction);
``NOT_POSITIVE`` for a flux <= 0 (no magnitude, values kept); ``NO_DATA`` for an alert without a usable
difference cutout (the reason in column ``problem``).

Noise of a difference pixel: ``sky_var + S/gain + T/(gain * nframesref)`` with
``sky_var`` the robust (1.4826 MAD) variance of the difference cutout's pixels, ``S``
and ``T`` the science and template pixels above their sky (the Poisson noise of the
sources on both sides of the subtraction; the template is a co-add of ``nframesref``
frames, default 15) and ZTF's nominal gain 6.2 e-/ADU (``gain=``).

The flux is in DN on the difference cutout, a total (PSF) flux like ``magpsf``:
``mag = magzpsci - 2.5 log10(flux)``.

The work is done for all alerts of a batch at once, by stage: :mod:`.pixels` (sky,
stamps, noise, sources), :mod:`.psf` (star fits, PSF choice, groups), :mod:`.forced`
(the forced fits), :mod:`.results` (the table), orchestrated by :mod:`.pipeline`.
Entry points: :func:`measure_batch` (alerts a caller holds: a pyarrow or pandas table),
:func:`measure_files` and :func:`measure_stream` (streams of batches, bounded memory).
"""

from .config import DEFAULT_NFRAMESREF, ZTF_GAIN, AlertPSFConfig
from .pipeline import MAX_PENDING, measure_batch, measure_files, measure_stream
from .pixels import candidate_center
from .psf import PSFGroups
from .results import PIPELINE_COLUMNS, RESULT_COLUMNS

__all__ = [
    "ZTF_GAIN",
    "DEFAULT_NFRAMESREF",
    "AlertPSFConfig",
    "PSFGroups",
    "measure_batch",
    "measure_files",
    "measure_stream",
    "MAX_PENDING",
    "candidate_center",
    "RESULT_COLUMNS",
    "PIPELINE_COLUMNS",
]
