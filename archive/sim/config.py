"""Configuration of the survey simulator (one dataclass, documented defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from archive.errors import ValidationError

#: Bands the simulator knows (every object has a flux in each).
KNOWN_BANDS = ("g", "r", "i")


@dataclass
class SimConfig:
    """Everything that defines a simulated survey; the same config and seed give the same files.

    Geometry and time
        ``size`` (or ``width``/``height``) imaging pixels per detector;
        ``n_detectors`` arranged on a grid with ``detector_gap`` pixels between
        them; ``pixel_scale`` arcsec/pixel; field centre ``ra0``/``dec0`` (deg);
        ``n_epochs`` visits starting at ``mjd0`` (MJD TAI) every
        ``cadence_days`` (+- ``cadence_jitter_days``); ``bands`` observed in turn.
    Pointing
        ``dither_arcsec`` rms offset, ``rotation_deg`` rms rotation per visit;
        ``distortion_px`` radial SIP distortion (pixels) at the corner of the
        focal plane; the raw headers carry a WCS that is off by
        ``wcs_offset_arcsec`` (rms per axis) and ``wcs_rotation_error_deg``
        (rms) and lacks the distortion - the truth keeps the true TAN-SIP WCS.
    Camera
        ``gain`` e-/adu, ``read_noise`` e-, ``bias_level`` adu,
        ``overscan_width`` columns, ``dark_current`` e-/s/pixel,
        ``full_well`` electrons (bloom beyond it), ``hot_pixel_fraction``,
        ``n_bad_columns``, ``flat_pixel_rms`` (pixel-to-pixel QE rms),
        ``vignetting`` (fractional loss at the corner).
    Photometry
        ``zero_points``: AB magnitude giving 1 e-/s at airmass 1 per band;
        ``extinction``: mag per airmass; ``sky_mag``: sky brightness,
        mag/arcsec^2; ``sky_gradient``: fractional change across a detector;
        ``color_terms``: ``c_b`` such that the reference catalog's magnitude is
        ``m_ref,b = m_b - c_b (g - r)`` (the camera's bands differ from the
        catalog's system; 0 = same system).
    Seeing
        ``seeing_arcsec`` median FWHM, ``seeing_scatter`` (fractional rms
        between epochs), ``psf_beta`` (Moffat), ``psf_variation`` fractional
        FWHM change from centre to edge of a detector.
    Sky content (densities per arcmin^2)
        stars with r in [``star_mag_range``] and counts ``dN/dm ~ 10**(star_count_slope*m)``;
        galaxies likewise; ``variable_fraction`` of stars brighter than
        ``variable_mag_limit`` vary periodically; ``n_transients`` per detector
        area (``transient_host_fraction`` on galaxies); ``n_moving`` moving objects.
    Artifacts
        ``cosmic_ray_rate`` per Mpix per 30 s; ``streak_epochs`` visit indices
        that get a satellite streak (default: one, chosen from the seed);
        ``bad_epochs`` ``{index: "clouds" | "focus"}`` (default: one of each for
        n_epochs >= 6, one "clouds" for n_epochs >= 4).
    Calibration frames
        ``n_bias``, ``n_dark`` (``dark_exp_time`` s each), ``n_flat`` per band
        (``flat_level`` electrons).
    """

    seed: int = 1
    n_epochs: int = 10
    size: int = 1024
    width: int | None = None
    height: int | None = None
    n_detectors: int = 1
    detector_gap: int = 60
    bands: tuple[str, ...] = ("r",)
    pixel_scale: float = 0.2
    ra0: float = 150.0
    dec0: float = 2.0
    mjd0: float = 60000.0
    cadence_days: float = 1.0
    cadence_jitter_days: float = 0.1
    exp_time: float = 30.0
    dither_arcsec: float = 20.0
    rotation_deg: float = 0.3
    distortion_px: float = 3.0
    wcs_offset_arcsec: float = 1.5
    wcs_rotation_error_deg: float = 0.02

    gain: float = 1.6
    read_noise: float = 5.0
    bias_level: float = 1000.0
    overscan_width: int = 32
    dark_current: float = 0.02
    full_well: float = 90000.0
    hot_pixel_fraction: float = 2e-4
    n_bad_columns: int = 2
    flat_pixel_rms: float = 0.01
    vignetting: float = 0.08

    zero_points: dict[str, float] = field(default_factory=lambda: {"g": 28.3, "r": 28.2, "i": 27.9})
    extinction: dict[str, float] = field(default_factory=lambda: {"g": 0.20, "r": 0.12, "i": 0.08})
    sky_mag: dict[str, float] = field(default_factory=lambda: {"g": 22.2, "r": 21.2, "i": 20.4})
    sky_gradient: float = 0.04
    color_terms: dict[str, float] = field(default_factory=lambda: {"g": 0.0, "r": 0.0, "i": 0.0})

    seeing_arcsec: float = 0.85
    seeing_scatter: float = 0.15
    psf_beta: float = 3.5
    psf_variation: float = 0.08

    star_density: float = 12.0
    star_mag_range: tuple[float, float] = (14.5, 25.0)
    star_count_slope: float = 0.25
    galaxy_density: float = 15.0
    galaxy_mag_range: tuple[float, float] = (18.0, 25.0)
    galaxy_count_slope: float = 0.4
    variable_fraction: float = 0.05
    variable_mag_limit: float = 22.0
    n_transients: int = 4
    transient_host_fraction: float = 0.5
    n_moving: int = 1

    cosmic_ray_rate: float = 8.0
    streak_epochs: tuple[int, ...] | None = None
    bad_epochs: dict[int, str] | None = None

    n_bias: int = 5
    n_dark: int = 5
    dark_exp_time: float = 120.0
    n_flat: int = 5
    flat_level: float = 25000.0

    def __post_init__(self) -> None:
        self.bands = tuple(str(b) for b in self.bands)
        self.star_mag_range = tuple(float(v) for v in self.star_mag_range)  # type: ignore[assignment]
        self.galaxy_mag_range = tuple(float(v) for v in self.galaxy_mag_range)  # type: ignore[assignment]
        if self.streak_epochs is not None:
            self.streak_epochs = tuple(int(v) for v in self.streak_epochs)
        if self.bad_epochs is not None:
            self.bad_epochs = {int(k): str(v) for k, v in self.bad_epochs.items()}
        self.validate()

    # ---- derived
    @property
    def nx(self) -> int:
        """Imaging pixels along x per detector."""
        return int(self.width if self.width is not None else self.size)

    @property
    def ny(self) -> int:
        """Imaging pixels along y per detector."""
        return int(self.height if self.height is not None else self.size)

    def validate(self) -> None:
        """Raise :class:`ValidationError` naming the first bad field."""
        def bad(name, why):
            raise ValidationError(f"SimConfig.{name}: {why} (got {getattr(self, name)!r})")

        if self.n_epochs < 1:
            bad("n_epochs", "must be >= 1")
        if self.nx < 32 or self.ny < 32:
            bad("size", "detectors must be at least 32 x 32 pixels")
        if self.nx > 8192 or self.ny > 8192:
            bad("size", "detectors larger than 8192 pixels are not supported")
        if self.n_detectors < 1 or self.n_detectors > 64:
            bad("n_detectors", "must be 1..64")
        if not self.bands:
            bad("bands", "needs at least one band")
        for b in self.bands:
            if b not in KNOWN_BANDS:
                bad("bands", f"unknown band {b!r}; known: {', '.join(KNOWN_BANDS)}")
        for name in ("zero_points", "extinction", "sky_mag", "color_terms"):
            d = getattr(self, name)
            missing = [b for b in KNOWN_BANDS if b not in d]
            if missing:
                bad(name, f"missing bands {missing}")
        for name in ("pixel_scale", "exp_time", "gain", "full_well", "seeing_arcsec", "flat_level",
                     "dark_exp_time", "cadence_days"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, "must be finite and > 0")
        for name in ("read_noise", "dark_current", "dither_arcsec", "rotation_deg", "distortion_px",
                     "wcs_offset_arcsec", "wcs_rotation_error_deg", "hot_pixel_fraction", "flat_pixel_rms",
                     "vignetting", "star_density", "galaxy_density", "variable_fraction", "cosmic_ray_rate",
                     "seeing_scatter", "psf_variation", "sky_gradient", "cadence_jitter_days"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, "must be finite and >= 0")
        if self.psf_beta <= 1:
            bad("psf_beta", "must be > 1")
        if not 0 <= self.variable_fraction <= 1:
            bad("variable_fraction", "must be in [0, 1]")
        if not 0 <= self.transient_host_fraction <= 1:
            bad("transient_host_fraction", "must be in [0, 1]")
        if self.vignetting >= 0.9:
            bad("vignetting", "must be < 0.9")
        if self.bias_level + self.full_well / self.gain > 65000:
            bad("full_well", "bias_level + full_well / gain must stay below the 16-bit range (65000 adu)")
        for name in ("star_mag_range", "galaxy_mag_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                bad(name, "needs (bright, faint) with bright < faint")
        if self.n_transients < 0 or self.n_moving < 0:
            bad("n_transients", "counts must be >= 0")
        if min(self.n_bias, self.n_dark, self.n_flat) < 1:
            bad("n_bias", "needs at least one bias, dark and flat frame")
        if self.overscan_width < 4:
            bad("overscan_width", "must be >= 4 columns")
        if self.streak_epochs is not None and any(not 0 <= e < self.n_epochs for e in self.streak_epochs):
            bad("streak_epochs", "indices must lie in [0, n_epochs)")
        if self.bad_epochs is not None:
            for k, v in self.bad_epochs.items():
                if not 0 <= k < self.n_epochs:
                    bad("bad_epochs", f"index {k} outside [0, n_epochs)")
                if v not in ("clouds", "focus"):
                    bad("bad_epochs", f"kind {v!r} is not 'clouds' or 'focus'")

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples become lists, dict keys strings)."""
        d = dataclasses.asdict(self)
        if d["bad_epochs"] is not None:
            d["bad_epochs"] = {str(k): v for k, v in d["bad_epochs"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SimConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ValidationError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValidationError(f"SimConfig: unknown fields {unknown}")
        kw = dict(d)
        for key in ("bands", "star_mag_range", "galaxy_mag_range", "streak_epochs"):
            if kw.get(key) is not None:
                kw[key] = tuple(kw[key])
        return cls(**kw)
