"""Astrometric calibration: match sources to a reference catalog, fit TAN-SIP.

1. The reference stars are projected to pixels with the header WCS.
2. Coarse search (tolerates tens of pixels of offset and about a degree of
   rotation): for every trial rotation about the detector centre, all
   (source - reference) offsets of the brightest objects are histogrammed; the
   rotation and offset with the highest peak win. All pairs and all offsets of one
   rotation are one vectorized histogram.
3. Nearest-neighbour matching within a shrinking radius, and a weighted TAN-SIP fit
   (:func:`fit_tan_sip`: the standard coordinates as polynomials of the pixel
   offsets, weighted by the reference errors; the starting tangent point from
   :func:`astropy.wcs.utils.fit_wcs_from_points`) with sigma clipping, iterated.

The result holds the fitted WCS, the matched pairs and the residual rms (px and
arcsec).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pandas as pd
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points, proj_plane_pixel_scales
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.sky.projection import gnomonic, inverse_gnomonic

log = logging.getLogger(__name__)

#: median of a Rayleigh distribution in units of its per-axis sigma: sqrt(2 ln 2)
RAYLEIGH_MEDIAN = float(np.sqrt(2.0 * np.log(2.0)))


@dataclass
class AstrometryConfig:
    """Configuration of :func:`fit_astrometry`.

    max_offset: largest header-WCS offset searched (px).
    max_rotation: largest rotation error searched (deg) ...
    rotation_step: ... in steps of this (deg).
    bin_size: offset histogram bin (px).
    n_bright: brightest sources / reference stars used in the coarse search.
    match_radii: matching radii of the successive fit iterations (px); the first must cover the
        header WCS's missing distortion, repeats let the match set grow as the fit improves.
    sip_degree: highest SIP polynomial degree (0 or None = pure TAN) ...
    matches_per_sip_term: ... lowered until there are this many matches per polynomial coefficient
        of one axis (``(degree + 1)(degree + 2) / 2`` coefficients).
    clip_sigma: residual clipping threshold in the fit.
    min_matches: fewer matches than this is an error.
    min_snr: sources below this S/N are not used.
    weight_by_errors: weight the fit by the reference catalog's ``ra_err``/``dec_err`` (mas) and the
        sources' ``x_err``/``y_err`` ...
    centroid_floor_mas: ... plus this systematic floor in quadrature (mas; PSF-model centroid errors).
    radial_distortion: with too few matches for a cubic SIP, fit a radial cubic term instead.
    """

    max_offset: float = 60.0
    max_rotation: float = 1.5
    rotation_step: float = 0.1
    bin_size: float = 2.0
    n_bright: int = 150
    match_radii: tuple[float, ...] = (8.0, 4.0, 4.0, 2.0, 2.0, 1.5)
    sip_degree: int | None = 3
    matches_per_sip_term: int = 3
    clip_sigma: float = 3.0
    min_matches: int = 8
    min_snr: float = 10.0
    weight_by_errors: bool = True
    centroid_floor_mas: float = 10.0
    radial_distortion: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AstrometryResult:
    """wcs: fitted WCS; matches: matched pairs (source index ``src``, reference index
    ``ref``, pixel residuals ``dx, dy``, ``used`` in the final fit); rms_px / rms_arcsec:
    rms of the used residuals per axis; offset_px, rotation_deg: coarse correction found."""

    wcs: WCS
    matches: pd.DataFrame
    n_matches: int
    rms_px: float
    rms_arcsec: float
    offset_px: tuple[float, float]
    rotation_deg: float


def _coarse(sx, sy, rx, ry, centre, cfg: AstrometryConfig):
    """Best (rotation, dx, dy, votes) of reference pixels onto source pixels."""
    best = (0.0, 0.0, 0.0, -1)
    nb = int(np.ceil(2 * cfg.max_offset / cfg.bin_size))
    edges = np.linspace(-cfg.max_offset, cfg.max_offset, nb + 1)
    n_rot = int(round(cfg.max_rotation / cfg.rotation_step))
    for k in range(-n_rot, n_rot + 1):
        th = np.deg2rad(k * cfg.rotation_step)
        c, s = np.cos(th), np.sin(th)
        qx = centre[0] + c * (rx - centre[0]) - s * (ry - centre[1])
        qy = centre[1] + s * (rx - centre[0]) + c * (ry - centre[1])
        dx = (sx[:, None] - qx[None, :]).ravel()
        dy = (sy[:, None] - qy[None, :]).ravel()
        ok = (np.abs(dx) < cfg.max_offset) & (np.abs(dy) < cfg.max_offset)
        h, _, _ = np.histogram2d(dx[ok], dy[ok], bins=[edges, edges])
        # a true offset may straddle bins: sum 2x2 neighbourhoods
        h2 = h[:-1, :-1] + h[1:, :-1] + h[:-1, 1:] + h[1:, 1:]
        i, j = np.unravel_index(np.argmax(h2), h2.shape)
        votes = int(h2[i, j])
        if votes > best[3]:
            # refine the offset as the mean of the pairs in the winning 2x2 cell
            lo_x, hi_x = edges[i], edges[i + 2]
            lo_y, hi_y = edges[j], edges[j + 2]
            sel = ok & (dx >= lo_x) & (dx < hi_x) & (dy >= lo_y) & (dy < hi_y)
            best = (k * cfg.rotation_step, float(np.median(dx[sel])), float(np.median(dy[sel])), votes)
    return best


def fit_tan_sip(x, y, ra, dec, weights, centre, degree: int | None, start: tuple[float, float],
                radial: bool = False) -> WCS:
    """Weighted least-squares TAN-SIP WCS from pixel (x, y) to sky (ra, dec) (deg).

    The standard coordinates about the tangent point are fitted as full polynomials
    of degree ``degree`` in the pixel offsets from ``centre``; the linear part is the
    CD matrix, the rest becomes the SIP A/B polynomials. With ``radial`` (and degree
    below 3) two cubic columns ``u r^2`` and ``v r^2`` are added: a radial distortion
    that few reference stars can constrain. The tangent point starts at ``start`` and
    is moved to the sky position of ``centre`` (two iterations).
    """
    from astropy.wcs import Sip

    d = int(degree) if degree else 1
    u = np.asarray(x, dtype=np.float64) - centre[0]
    v = np.asarray(y, dtype=np.float64) - centre[1]
    terms = [(p, q) for n in range(d + 1) for q in range(n + 1) for p in [n - q]]
    scale = max(np.abs(u).max(), np.abs(v).max(), 1.0)
    cols = [(u / scale) ** p * (v / scale) ** q for p, q in terms]
    use_radial = bool(radial and d < 3)
    if use_radial:
        r2 = (u / scale) ** 2 + (v / scale) ** 2
        cols += [(u / scale) * r2, (v / scale) * r2]
    X = np.column_stack(cols)
    w = np.asarray(weights, dtype=np.float64)
    ra0, dec0 = start
    for _ in range(3):
        xi, eta = gnomonic(ra, dec, ra0, dec0)
        A = (X * w[:, None]).T @ X
        A += 1e-12 * np.trace(A) / A.shape[0] * np.eye(A.shape[0])
        cx = np.linalg.solve(A, (X * w[:, None]).T @ xi)
        cy = np.linalg.solve(A, (X * w[:, None]).T @ eta)
        ra0, dec0 = inverse_gnomonic(cx[0], cy[0], ra0, dec0)
    coef = {t: (cx[k] / scale ** (t[0] + t[1]), cy[k] / scale ** (t[0] + t[1])) for k, t in enumerate(terms)}
    if use_radial:
        # u r^2 = u^3 + u v^2, v r^2 = u^2 v + v^3
        ku = (cx[len(terms)] / scale ** 3, cy[len(terms)] / scale ** 3)
        kv = (cx[len(terms) + 1] / scale ** 3, cy[len(terms) + 1] / scale ** 3)
        for t, kk in (((3, 0), ku), ((1, 2), ku), ((2, 1), kv), ((0, 3), kv)):
            old = coef.get(t, (0.0, 0.0))
            coef[t] = (old[0] + kk[0], old[1] + kk[1])
        d = max(d, 3)
    cdm = np.array([[coef[(1, 0)][0], coef[(0, 1)][0]], [coef[(1, 0)][1], coef[(0, 1)][1]]])
    wcs = WCS(naxis=2)
    wcs.wcs.crpix = [centre[0] + 1.0, centre[1] + 1.0]
    wcs.wcs.crval = [float(ra0), float(dec0)]
    wcs.wcs.cd = cdm
    if d >= 2:
        inv = np.linalg.inv(cdm)
        a = np.zeros((d + 1, d + 1))
        b = np.zeros((d + 1, d + 1))
        for (p, q), (fx, fy) in coef.items():
            if p + q >= 2:
                sa, sb = inv @ np.array([fx, fy])
                a[p, q] = sa
                b[p, q] = sb
        wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    else:
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.set()
    return wcs


def usable_for_astrometry(sources: pd.DataFrame, min_snr: float,
                          mask_planes: Mapping[str, int] | None = None) -> np.ndarray:
    """Boolean mask of sources fit for astrometry: finite ``x, y``, ``snr`` above ``min_snr``
    (when present), no SAT/CR/BAD/NO_DATA pixel and a good centroid (when ``flags`` is present).

    The mask bits of ``flags`` are decoded with ``mask_planes`` (the exposure's layout), else the
    layout the table was measured with (:func:`archive.process.measure.flag_layout`)."""
    from archive.process import flags as F_
    from archive.process.measure import flag_layout

    ok = np.isfinite(sources["x"].to_numpy(np.float64)) & np.isfinite(sources["y"].to_numpy(np.float64))
    if "snr" in sources:
        ok &= sources["snr"].to_numpy(np.float64) > min_snr
    if "flags" in sources:
        planes = flag_layout(sources, mask_planes)
        bad = F_.plane_bits(planes, "SAT", "CR", "BAD", "NO_DATA") | int(F_.FLAG_CENTROID | F_.FLAG_STAMP_EDGE)
        ok &= (sources["flags"].to_numpy() & bad) == 0
    return ok


def _sip_degree(max_degree: int | None, n: int, per_term: int) -> int | None:
    """Highest SIP degree <= max_degree with ``per_term`` matches per coefficient of one axis."""
    d = int(max_degree or 0)
    while d >= 2 and n < per_term * (d + 1) * (d + 2) // 2:
        d -= 1
    return d if d >= 2 else None


def fit_astrometry(sources: pd.DataFrame, refcat: pd.DataFrame, wcs: WCS, shape: tuple[int, int], *,
                   ref_mag: str | None = None, config: AstrometryConfig | None = None,
                   mask_planes: Mapping[str, int] | None = None) -> AstrometryResult:
    """Fit a TAN-SIP WCS for ``sources`` (columns ``x, y``, ``snr``, ``psf_flux``) against
    ``refcat`` (columns ``ra, dec`` in degrees; ``ref_mag`` names a magnitude column used
    to pick the brightest), starting from the header ``wcs`` of an image of ``shape``.
    ``mask_planes``: the mask layout of the ``flags`` bits (default: the table's own, see
    :func:`usable_for_astrometry`)."""
    cfg = config or AstrometryConfig()
    if wcs is None or not wcs.has_celestial:
        raise ValidationError("fit_astrometry: a celestial starting WCS is required")
    for c in ("ra", "dec"):
        if c not in refcat:
            raise ValidationError(f"fit_astrometry: reference catalog lacks column {c!r}")
    for c in ("x", "y"):
        if c not in sources:
            raise ValidationError(f"fit_astrometry: source table lacks column {c!r}")
    ny, nx = shape
    src = sources
    src = src[usable_for_astrometry(src, cfg.min_snr, mask_planes)]
    src_idx = src.index.to_numpy()
    sx = src["x"].to_numpy(np.float64)
    sy = src["y"].to_numpy(np.float64)
    rx, ry = wcs.all_world2pix(refcat["ra"].to_numpy(np.float64), refcat["dec"].to_numpy(np.float64), 0)
    margin = cfg.max_offset + 0.02 * max(nx, ny)
    inside = (rx > -margin) & (rx < nx - 1 + margin) & (ry > -margin) & (ry < ny - 1 + margin) & np.isfinite(rx)
    ref_idx = np.nonzero(inside)[0]
    if len(src_idx) < cfg.min_matches or ref_idx.size < cfg.min_matches:
        raise ValidationError(f"fit_astrometry: too few objects ({len(src_idx)} sources, {ref_idx.size} reference "
                              f"stars on the image); need >= {cfg.min_matches}")
    rx, ry = rx[ref_idx], ry[ref_idx]
    # brightest subsets for the coarse search
    if "psf_flux" in src:
        ob = np.argsort(-src["psf_flux"].fillna(-np.inf).to_numpy())[: cfg.n_bright]
    else:
        ob = np.arange(min(len(sx), cfg.n_bright))
    if ref_mag is not None and ref_mag in refcat:
        orf = np.argsort(refcat[ref_mag].to_numpy(np.float64)[ref_idx])[: cfg.n_bright]
    else:
        orf = np.arange(min(len(rx), cfg.n_bright))
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    rot, dx0, dy0, votes = _coarse(sx[ob], sy[ob], rx[orf], ry[orf], centre, cfg)
    log.info("astrometry coarse: rotation %.2f deg, offset (%.1f, %.1f) px, %d votes", rot, dx0, dy0, votes)
    if votes < 4:
        raise ValidationError(f"fit_astrometry: no consistent offset found (best {votes} votes)")
    th = np.deg2rad(rot)
    c, s = np.cos(th), np.sin(th)
    qx = centre[0] + c * (rx - centre[0]) - s * (ry - centre[1]) + dx0
    qy = centre[1] + s * (rx - centre[0]) + c * (ry - centre[1]) + dy0
    ref_sky = SkyCoord(refcat["ra"].to_numpy(np.float64)[ref_idx] * u.deg,
                       refcat["dec"].to_numpy(np.float64)[ref_idx] * u.deg)
    cur = None
    # weights: reference position errors (columns ra_err/dec_err, in mas) plus a centroid floor
    wts = None
    if cfg.weight_by_errors and "ra_err" in refcat and "dec_err" in refcat:
        e2 = (refcat["ra_err"].to_numpy(np.float64)[ref_idx] ** 2 + refcat["dec_err"].to_numpy(np.float64)[ref_idx] ** 2) / 2
        e2 = np.where(np.isfinite(e2), e2, np.nanmedian(e2))
        wts = e2  # reference variance (mas^2); the sources' own errors are added per match below
    # source centroid variance in mas^2 (pixel errors times the header pixel scale) plus a floor
    pix_mas = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3.6e6
    if "x_err" in src and "y_err" in src:
        se2 = 0.5 * (src["x_err"].to_numpy(np.float64) ** 2 + src["y_err"].to_numpy(np.float64) ** 2) * pix_mas ** 2
        se2 = np.where(np.isfinite(se2), se2, np.nanmedian(se2) if np.isfinite(se2).any() else 0.0)
    else:
        se2 = np.zeros(len(sx))
    se2 = se2 + cfg.centroid_floor_mas ** 2
    tree_src = cKDTree(np.column_stack([sx, sy]))
    used = None
    for radius in cfg.match_radii:
        if cur is not None:
            qx, qy = cur.all_world2pix(ref_sky.ra.deg, ref_sky.dec.deg, 0)
        d, j = tree_src.query(np.column_stack([qx, qy]), k=1, distance_upper_bound=radius)
        m = np.isfinite(d)
        # one reference per source: keep the closest
        ri = np.nonzero(m)[0]
        si = j[m]
        order = np.argsort(d[m])
        _, first = np.unique(si[order], return_index=True)
        ri, si = ri[order][first], si[order][first]
        if ri.size < cfg.min_matches:
            raise ValidationError(f"fit_astrometry: only {ri.size} matches within {radius} px")
        used = np.ones(ri.size, dtype=bool)
        for _ in range(3):
            deg = _sip_degree(cfg.sip_degree, int(used.sum()), cfg.matches_per_sip_term)
            if cur is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    start = fit_wcs_from_points((sx[si[used]], sy[si[used]]), ref_sky[ri[used]],
                                                proj_point="center", projection="TAN")
                start_radec = tuple(float(v) for v in start.all_pix2world(centre[0], centre[1], 0))
            radial = bool(cfg.radial_distortion and (deg or 0) < 3 and used.sum() >= 8)
            cur = fit_tan_sip(sx[si[used]], sy[si[used]], ref_sky.ra.deg[ri[used]], ref_sky.dec.deg[ri[used]],
                              1.0 / ((wts[ri[used]] if wts is not None else 0.0) + se2[si[used]]), centre,
                              deg if (deg or 0) >= 2 else None, start_radec, radial=radial)
            px, py = cur.all_world2pix(ref_sky.ra.deg[ri], ref_sky.dec.deg[ri], 0)
            rx_, ry_ = sx[si] - px, sy[si] - py
            rr = np.hypot(rx_, ry_)
            # per-axis sigma from the radial residuals: their median is sigma sqrt(2 ln 2) for a
            # circular Gaussian (Rayleigh); no MAD factor on top of that (it made the clip ~4.4 sigma)
            sig = np.median(rr[used]) / RAYLEIGH_MEDIAN if used.any() else np.inf
            new = rr < max(cfg.clip_sigma * sig, 1e-3)
            if np.array_equal(new, used) or new.sum() < cfg.min_matches:
                break
            used = new
    resx, resy = rx_, ry_
    rms_px = float(np.sqrt(0.5 * np.mean(resx[used] ** 2 + resy[used] ** 2)))
    scale = float(np.mean(proj_plane_pixel_scales(cur.celestial))) * 3600.0
    matches = pd.DataFrame({"src": src_idx[si], "ref": ref_idx[ri], "dx": resx, "dy": resy, "used": used})
    cur.pixel_shape = (nx, ny)
    log.info("astrometry: %d matches (%d used), rms %.3f px = %.3f arcsec", len(matches), int(used.sum()), rms_px,
             rms_px * scale)
    return AstrometryResult(wcs=cur, matches=matches, n_matches=int(used.sum()), rms_px=rms_px,
                            rms_arcsec=rms_px * scale, offset_px=(dx0, dy0), rotation_deg=rot)
