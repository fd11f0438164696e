"""Relative astrometry: refine the WCS of all epochs of a field against each other.

Each epoch's WCS is first fitted to the reference catalog on its own
(:func:`archive.process.astrometry.fit_astrometry`); that fit is limited by the
reference stars on the detector (a few hundred at most, with errors of 5-20 mas)
and has to find the optical distortion from them alone. The same stars are seen
on every epoch, the distortion belongs to the detector, not to the epoch, and
the epochs are measured by the same camera, so a joint fit (in the spirit of
LSST's jointcal, JWST's tweakreg and LAST's relative astrometry) ties them
together much more tightly:

* model: epoch ``i``'s detection at pixel ``(x, y)`` of detector ``g`` lies at
  ``a_i + B_i (p + D_g(p))`` in one tangent plane about the field centre, where
  ``p`` are the pixel offsets from the detector centre, ``D_g`` a polynomial
  distortion of degree 2..``distortion_degree`` shared by all epochs of detector
  ``g``, and ``(a_i, B_i)`` an affine map per epoch (pointing, rotation, scale);
* stars: the detections of one star across epochs are grouped by friends-of-friends
  within ``match_radius_arcsec`` (a group with two detections from one epoch is
  ambiguous and dropped); each detection's target is the weighted mean of the
  *other* epochs' detections of its star (leave-one-out, so an epoch is never
  fitted to itself);
* fit: alternately the per-epoch affine maps (weighted, sigma-clipped) and the
  per-detector distortion (all epochs pooled), ``n_iter`` times;
* frame: the relative fit keeps the mean frame of the input WCSs; with a reference
  catalog, one weighted affine map of the mean star positions onto it fixes the
  absolute frame, and is composed into every epoch's map.

Each epoch's model is then sampled on a pixel grid and written as a TAN-SIP WCS.
Pure: source tables and WCSs in, WCSs and a report out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.process.astrometry import fit_tan_sip, usable_for_astrometry
from archive.sky.projection import gnomonic, inverse_gnomonic

log = logging.getLogger(__name__)


@dataclass
class RelativeAstrometryConfig:
    """Configuration of :func:`refine_epochs`.

    match_radius_arcsec: friends-of-friends linking length for detections of one star.
    min_epochs: a star is used when detected (unambiguously) on at least this many epochs.
    min_snr: sources below this S/N are not used.
    n_iter: alternations of the per-epoch affine fits and the distortion fit.
    clip_sigma: residual clipping threshold (in units of each detection's error).
    distortion_degree: highest degree of the per-detector distortion polynomial
        (terms of degree 2 and up; below 2: no distortion term, the input WCSs' own
        distortion is then not kept either).
    grid: the refined model of each epoch is written as TAN-SIP fitted to a grid x grid
        sample of its detector.
    centroid_floor_mas: systematic floor added in quadrature to every centroid error (mas).
    use_reference: tie the common frame to the reference catalog when one is given.
    min_stars: an epoch with fewer usable stars keeps its input WCS (``refined`` False).
    """

    match_radius_arcsec: float = 0.5
    min_epochs: int = 3
    min_snr: float = 10.0
    n_iter: int = 6
    clip_sigma: float = 3.0
    distortion_degree: int = 3
    grid: int = 16
    centroid_floor_mas: float = 5.0
    use_reference: bool = True
    min_stars: int = 20

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RelativeAstrometryResult:
    """wcs: the refined WCS of every epoch (input order; the input WCS where ``refined`` is
    False); n_stars: stars of the common catalog (detected on >= ``min_epochs`` epochs);
    n_used: detections used in each epoch's final affine fit; rms_before_mas /
    rms_after_mas: per epoch, rms per axis of (position - leave-one-out mean of the other
    epochs) over its detections of common stars, before and after (mas); n_reference:
    reference stars used for the frame; stars: the common catalog (``ra``, ``dec`` in deg,
    weighted mean over epochs, ``n_epochs``, ``err_mas`` per axis, ``ref`` row of the
    reference catalog or -1)."""

    wcs: list[WCS]
    refined: np.ndarray
    n_stars: int
    n_used: np.ndarray
    rms_before_mas: np.ndarray
    rms_after_mas: np.ndarray
    n_reference: int
    stars: pd.DataFrame


def _groups(xi: np.ndarray, eta: np.ndarray, epoch: np.ndarray, radius: float) -> np.ndarray:
    """Friends-of-friends group label of every detection (-1: unusable).

    A group holding two detections of one epoch is ambiguous (blend, double star,
    chained neighbours) and gets -1 for all its members."""
    n = len(xi)
    pairs = cKDTree(np.column_stack([xi, eta])).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    label = label.astype(np.int64)
    base = int(epoch.max()) + 2
    uniq, counts = np.unique(label * base + epoch, return_counts=True)
    label[np.isin(label, np.unique(uniq[counts > 1] // base))] = -1
    return label


def _terms(lo: int, hi: int) -> list[tuple[int, int]]:
    return [(n - q, q) for n in range(lo, hi + 1) for q in range(n + 1)]


def _poly(u: np.ndarray, v: np.ndarray, terms) -> np.ndarray:
    return np.column_stack([u ** p * v ** q for p, q in terms]) if terms else np.zeros((len(u), 0))


def _wls(X: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    A = (X * w[:, None]).T @ X
    A += 1e-12 * max(np.trace(A), 1e-300) / A.shape[0] * np.eye(A.shape[0])
    return np.linalg.solve(A, (X * w[:, None]).T @ y)


def refine_epochs(sources: Sequence[pd.DataFrame], wcs: Sequence[WCS], shapes: Sequence[tuple[int, int]],
                  refcat: pd.DataFrame | None = None, config: RelativeAstrometryConfig | None = None,
                  detectors: Sequence[int] | None = None) -> RelativeAstrometryResult:
    """Refine the WCSs of overlapping epochs of one field against each other.

    ``sources[i]``: epoch i's detections (columns ``x``, ``y`` in pixels, origin 0;
    optional ``x_err``, ``y_err`` (px), ``snr``, ``flags``); ``wcs[i]``: its current
    (reference-fitted) WCS; ``shapes[i]``: its image shape (ny, nx); ``detectors[i]``:
    the detector it was taken with (epochs of one detector share a distortion; default:
    all the same detector). ``refcat`` (optional; columns ``ra``, ``dec`` in deg,
    optional ``ra_err``, ``dec_err`` in mas) fixes the absolute frame. Returns new WCS
    objects; the inputs are not modified.
    """
    cfg = config or RelativeAstrometryConfig()
    n_ep = len(sources)
    if not (n_ep == len(wcs) == len(shapes)):
        raise ValidationError(f"refine_epochs: {n_ep} source tables, {len(wcs)} WCSs and {len(shapes)} shapes; "
                              "need one of each per epoch")
    if n_ep < 2:
        raise ValidationError(f"refine_epochs: need at least 2 epochs, got {n_ep}")
    if cfg.min_epochs < 2:
        raise ValidationError(f"refine_epochs: min_epochs must be >= 2, got {cfg.min_epochs}")
    for i, s in enumerate(sources):
        for c in ("x", "y"):
            if c not in s:
                raise ValidationError(f"refine_epochs: source table of epoch {i} lacks column {c!r}")
    det = np.zeros(n_ep, dtype=np.int64) if detectors is None else np.asarray(detectors, dtype=np.int64)
    if det.shape != (n_ep,):
        raise ValidationError(f"refine_epochs: {len(det)} detector numbers for {n_ep} epochs")
    for g in np.unique(det):
        if len({tuple(shapes[i]) for i in np.flatnonzero(det == g)}) > 1:
            raise ValidationError(f"refine_epochs: epochs of detector {g} have different image shapes")

    # -- detections ---------------------------------------------------------------
    idx = [np.flatnonzero(usable_for_astrometry(s, cfg.min_snr)) for s in sources]
    ep = np.concatenate([np.full(len(k), i, dtype=np.int64) for i, k in enumerate(idx)])
    if ep.size == 0:
        raise ValidationError("refine_epochs: no usable sources on any epoch")
    px = np.concatenate([sources[i]["x"].to_numpy(np.float64)[k] for i, k in enumerate(idx)])
    py = np.concatenate([sources[i]["y"].to_numpy(np.float64)[k] for i, k in enumerate(idx)])
    scale_mas = np.array([float(np.mean(proj_plane_pixel_scales(w.celestial))) * 3.6e6 for w in wcs])
    err2 = np.concatenate([
        (0.5 * (sources[i]["x_err"].to_numpy(np.float64)[k] ** 2 + sources[i]["y_err"].to_numpy(np.float64)[k] ** 2)
         if "x_err" in sources[i] and "y_err" in sources[i] else np.zeros(len(k))) * scale_mas[i] ** 2
        for i, k in enumerate(idx)])
    err2 = np.where(np.isfinite(err2), err2, np.nanmedian(err2) if np.isfinite(err2).any() else 0.0)
    err2 = err2 + cfg.centroid_floor_mas ** 2  # mas^2 per axis
    # normalised pixel offsets from each detector's centre
    half = np.array([max(shapes[i]) / 2.0 for i in range(n_ep)])
    cxy = np.array([((shapes[i][1] - 1) / 2.0, (shapes[i][0] - 1) / 2.0) for i in range(n_ep)])
    u = (px - cxy[ep, 0]) / half[ep]
    v = (py - cxy[ep, 1]) / half[ep]

    def sky_of(ws, i, x, y):
        return ws[i].all_pix2world(x, y, 0)

    ra = np.empty(ep.size)
    dec = np.empty(ep.size)
    for i in range(n_ep):
        m = ep == i
        if m.any():
            ra[m], dec[m] = sky_of(wcs, i, px[m], py[m])
    # one tangent plane about the field centre (arcsec): a field is small enough for one plane
    vec = np.column_stack([np.cos(np.radians(dec)) * np.cos(np.radians(ra)),
                           np.cos(np.radians(dec)) * np.sin(np.radians(ra)), np.sin(np.radians(dec))]).mean(axis=0)
    ra0 = float(np.degrees(np.arctan2(vec[1], vec[0])) % 360.0)
    dec0 = float(np.degrees(np.arctan2(vec[2], np.hypot(vec[0], vec[1]))))

    def plane(r, d):
        a, b = gnomonic(r, d, ra0, dec0)
        return a * 3600.0, b * 3600.0

    xi, eta = plane(ra, dec)

    # -- stars ----------------------------------------------------------------------
    label = _groups(xi, eta, ep, cfg.match_radius_arcsec)
    ok = label >= 0
    _, inv, cnt = np.unique(label[ok], return_inverse=True, return_counts=True)
    keep = cnt >= cfg.min_epochs
    star = np.full(ep.size, -1, dtype=np.int64)
    star[np.flatnonzero(ok)] = np.where(keep[inv], (np.cumsum(keep) - 1)[inv], -1)
    n_star = int(keep.sum())
    if n_star == 0:
        raise ValidationError(f"refine_epochs: no star is detected on >= {cfg.min_epochs} epochs within "
                              f"{cfg.match_radius_arcsec} arcsec")
    n_on = np.bincount(ep[star >= 0], minlength=n_ep)
    active = n_on >= cfg.min_stars
    use = (star >= 0) & active[ep]  # detections that take part in the fit

    def loo(xi, eta):
        """Leave-one-out weighted mean over the other epochs, its variance (mas^2), and the
        per-star weight and weighted sums."""
        s = star[use]
        w = 1.0 / err2[use]
        sw = np.bincount(s, weights=w, minlength=n_star)
        sx = np.bincount(s, weights=w * xi[use], minlength=n_star)
        sy = np.bincount(s, weights=w * eta[use], minlength=n_star)
        mx = np.full(ep.size, np.nan)
        my = np.full(ep.size, np.nan)
        var = np.full(ep.size, np.inf)
        ow = sw[s] - w
        with np.errstate(invalid="ignore", divide="ignore"):
            mx[use] = np.where(ow > 0, (sx[s] - w * xi[use]) / ow, np.nan)
            my[use] = np.where(ow > 0, (sy[s] - w * eta[use]) / ow, np.nan)
            var[use] = 1.0 / ow
        return mx, my, var, (sw, sx, sy)

    def rms_per_epoch(xi, eta):
        mx, my, _, _ = loo(xi, eta)
        r2 = ((xi - mx) ** 2 + (eta - my) ** 2) * 1e6 / 2.0  # mas^2 per axis
        good = np.isfinite(r2)
        n = np.bincount(ep[good], minlength=n_ep)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(np.bincount(ep[good], weights=r2[good], minlength=n_ep) / n)

    rms_before = rms_per_epoch(xi, eta)

    # -- joint fit: per-epoch affine (a_i, B_i), per-detector distortion D_g ---------------
    # Gauss-Newton on all parameters at once: the distortion's cubic terms are strongly
    # correlated with the affine ones over a detector, so fitting them in turn converges slowly.
    dterms = _terms(2, cfg.distortion_degree) if cfg.distortion_degree >= 2 else []
    groups = {int(g): k for k, g in enumerate(np.unique(det))}
    nd = len(dterms)
    aff = np.zeros((n_ep, 3, 2))  # rows: constant, U, V -> columns (xi, eta)
    aff[:, 1, 0] = aff[:, 2, 1] = 1.0
    dcoef = np.zeros((len(groups), nd, 2))  # distortion of (u, v), per detector group
    gidx = np.array([groups[int(g)] for g in det])
    P = _poly(u, v, dterms)
    n_par = 6 * n_ep + 2 * nd * len(groups)

    def model(mask):
        g = gidx[ep[mask]]
        Pm = P[mask]
        U = u[mask] + np.einsum("nk,nk->n", Pm, dcoef[g, :, 0]) if nd else u[mask]
        V = v[mask] + np.einsum("nk,nk->n", Pm, dcoef[g, :, 1]) if nd else v[mask]
        A = aff[ep[mask]]
        return A[:, 0, 0] + A[:, 1, 0] * U + A[:, 2, 0] * V, A[:, 0, 1] + A[:, 1, 1] * U + A[:, 2, 1] * V, U, V

    def gauss_newton(mask, tx, ty, w):
        """One Gauss-Newton step of all parameters towards targets (tx, ty), weights w (per axis)."""
        n = int(mask.sum())
        fx, fy, U, V = model(mask)
        e = ep[mask]
        A = aff[e]
        g = gidx[e]
        rows, cols, vals = [], [], []
        r = np.arange(n)
        for axis in (0, 1):  # xi rows 0..n-1, eta rows n..2n-1
            rr = r + axis * n
            base = 6 * e + 3 * axis
            for k, val in enumerate((np.ones(n), U, V)):
                rows.append(rr), cols.append(base + k), vals.append(val)
            if nd:
                dbase = 6 * n_ep + 2 * nd * g
                for k in range(nd):
                    # d(model_axis)/d(dcoef_u[k]) = B[U-row, axis] * phi_k, and likewise for V
                    rows.append(rr), cols.append(dbase + k), vals.append(A[:, 1, axis] * P[mask][:, k])
                    rows.append(rr), cols.append(dbase + nd + k), vals.append(A[:, 2, axis] * P[mask][:, k])
        J = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                       shape=(2 * n, n_par)).tocsr()
        res = np.concatenate([tx - fx, ty - fy])
        W = np.concatenate([w, w])
        JW = J.multiply(W[:, None]).tocsr()
        N = (J.T @ JW).toarray()
        rhs = JW.T @ res
        # parameters of epochs without data (inactive) stay put
        free = np.flatnonzero(np.diag(N) > 0)
        Nf = N[np.ix_(free, free)]
        Nf += 1e-12 * np.trace(Nf) / len(free) * np.eye(len(free))
        step = np.zeros(n_par)
        step[free] = np.linalg.solve(Nf, rhs[free])
        aff[:] += step[:6 * n_ep].reshape(n_ep, 2, 3).transpose(0, 2, 1)
        if nd:
            dstep = step[6 * n_ep:].reshape(len(groups), 2, nd).transpose(0, 2, 1)
            dcoef[:] += dstep

    sel = use.copy()
    for it in range(max(int(cfg.n_iter), 1) + 1):
        # pass 0 reproduces the input WCSs (their own positions as targets); then the others' mean
        mx, my, var, _ = loo(xi, eta)
        if it == 0:
            tx, ty, sig2 = xi.copy(), eta.copy(), err2.copy()
        else:
            tx, ty, sig2 = mx, my, err2 + var
        fitm = sel & np.isfinite(tx)
        for _gn in range(3 if it == 0 else 2):
            gauss_newton(fitm, tx[fitm], ty[fitm], 1.0 / sig2[fitm])
        xi[use], eta[use] = model(use)[:2]
        if it:
            # clip against the current targets, in units of each detection's error
            mx, my, var, _ = loo(xi, eta)
            res = np.hypot(xi - mx, eta - my) * 1e3 / np.sqrt(err2 + var)
            new = use & np.isfinite(res)
            for i in np.flatnonzero(active):
                m = new & (ep == i)
                if m.any():
                    new[m] = res[m] < cfg.clip_sigma * max(1.0, 1.4826 * np.median(res[m]) / 1.1774)
            sel = new

    # -- absolute frame ------------------------------------------------------------
    _, _, _, (sw, sx, sy) = loo(xi, eta)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_x, mean_y = sx / sw, sy / sw
    ref_of_star = np.full(n_star, -1, dtype=np.int64)
    n_ref = 0
    if refcat is not None and cfg.use_reference and len(refcat):
        for c in ("ra", "dec"):
            if c not in refcat:
                raise ValidationError(f"refine_epochs: reference catalog lacks column {c!r}")
        rxi, reta = plane(refcat["ra"].to_numpy(np.float64), refcat["dec"].to_numpy(np.float64))
        # reference stars 90 deg or more from the field have no projection (NaN): out of reach
        rxi, reta = np.where(np.isfinite(rxi), rxi, 1e9), np.where(np.isfinite(reta), reta, 1e9)
        if "ra_err" in refcat and "dec_err" in refcat:
            re2 = 0.5 * (refcat["ra_err"].to_numpy(np.float64) ** 2 + refcat["dec_err"].to_numpy(np.float64) ** 2)
            fill = np.nanmedian(re2) if np.isfinite(re2).any() else 100.0
            re2 = np.where(np.isfinite(re2) & (re2 > 0), re2, fill)
        else:
            re2 = np.full(len(refcat), 100.0)
        fin = np.isfinite(mean_x)
        d, j = cKDTree(np.column_stack([rxi, reta])).query(
            np.column_stack([np.where(fin, mean_x, 1e9), np.where(fin, mean_y, 1e9)]),
            distance_upper_bound=cfg.match_radius_arcsec)
        hit = np.flatnonzero(np.isfinite(d))
        order = hit[np.argsort(d[hit])]
        _, first = np.unique(j[order], return_index=True)  # one star per reference star
        ref_of_star[order[first]] = j[order[first]]
        has = ref_of_star >= 0
        n_ref = int(has.sum())
        if n_ref >= 3:
            r = ref_of_star[has]
            w = 1.0 / (1.0 / sw[has] + re2[r])
            for _clip in range(3):  # clip reference outliers (wrong matches, proper motions)
                X = np.column_stack([np.ones(len(r)), mean_x[has], mean_y[has]])
                mcx, mcy = _wls(X, rxi[r], w), _wls(X, reta[r], w)
                res = np.hypot(X @ mcx - rxi[r], X @ mcy - reta[r]) * 1e3 * np.sqrt(w)
                good = res < cfg.clip_sigma * max(1.0, 1.4826 * np.median(res) / 1.1774)
                if good.all() or good.sum() < 3:
                    break
                w = np.where(good, w, 0.0)
            n_ref = int((w > 0).sum())
            M = np.column_stack([mcx, mcy])  # (3, 2): constant, xi, eta
            for i in np.flatnonzero(active):
                a = aff[i]
                aff[i] = np.vstack([M[0] + a[0] @ M[1:], a[1] @ M[1:], a[2] @ M[1:]])
            xi[use], eta[use] = model(use)[:2]
            _, _, _, (sw, sx, sy) = loo(xi, eta)
            mean_x, mean_y = sx / sw, sy / sw
    rms_after = rms_per_epoch(xi, eta)

    # -- WCS per epoch: the model sampled on a grid, fitted as TAN-SIP ----------------
    out = [w.deepcopy() for w in wcs]
    for i in np.flatnonzero(active):
        ny, nx = shapes[i]
        gx, gy = np.meshgrid(np.linspace(0, nx - 1, cfg.grid), np.linspace(0, ny - 1, cfg.grid))
        gx, gy = gx.ravel(), gy.ravel()
        gu, gv = (gx - cxy[i, 0]) / half[i], (gy - cxy[i, 1]) / half[i]
        dd = _poly(gu, gv, dterms) @ dcoef[gidx[i]] if nd else np.zeros((gx.size, 2))
        uc, vc = gu + dd[:, 0], gv + dd[:, 1]
        a = aff[i]
        gxi = a[0, 0] + a[1, 0] * uc + a[2, 0] * vc
        geta = a[0, 1] + a[1, 1] * uc + a[2, 1] * vc
        gra, gdec = inverse_gnomonic(gxi / 3600.0, geta / 3600.0, ra0, dec0)
        degree = max(cfg.distortion_degree, 1)
        start = tuple(float(c) for c in wcs[i].all_pix2world(cxy[i, 0], cxy[i, 1], 0))
        fit = fit_tan_sip(gx, gy, gra, gdec, np.ones(gx.size), tuple(cxy[i]), degree if degree >= 2 else None, start)
        fit.pixel_shape = (nx, ny)
        out[i] = fit
    n_used = np.bincount(ep[sel], minlength=n_ep)
    sra, sdec = inverse_gnomonic(mean_x / 3600.0, mean_y / 3600.0, ra0, dec0)
    stars = pd.DataFrame({"ra": sra, "dec": sdec, "n_epochs": np.bincount(star[use], minlength=n_star),
                          "err_mas": np.sqrt(1.0 / sw), "ref": ref_of_star})
    log.info("relative astrometry: %d stars on >= %d epochs, %d reference stars; rms per epoch %s -> %s mas",
             n_star, cfg.min_epochs, n_ref, np.round(rms_before, 1).tolist(), np.round(rms_after, 1).tolist())
    return RelativeAstrometryResult(wcs=out, refined=active.copy(), n_stars=n_star, n_used=n_used,
                                    rms_before_mas=rms_before, rms_after_mas=rms_after, n_reference=n_ref,
                                    stars=stars)
