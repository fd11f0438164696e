"""Multi-threshold deblending of detection footprints (SExtractor's criterion, whole-array).

A footprint (8-connected pixels above the detection threshold) with several candidate
peaks is a tree of branches: cut at a threshold ``t``, its pixels above ``t`` fall into
connected components. A secondary peak ``j`` heads a branch of its own above its
saddle (the highest threshold at which it is still joined to a brighter peak). The
peak is a separate object when that branch *and* its sibling (the component of the
nearest brighter peak at the same threshold) each hold at least ``min_contrast`` of the
footprint's total flux: the criterion of SExtractor's ``DEBLEND_MINCONT`` and of
photutils' ``deblend_sources``. Noise bumps and clumps on a galaxy hold a tiny fraction
of its flux and stay part of it; two stars of similar brightness each hold a large
share above their saddle and are split.

Thresholds. SExtractor cuts every footprint at 32 levels spaced exponentially between
the detection threshold and the footprint's maximum; on a bright galaxy (peak 1000x
the threshold) one level is a 24% step, so a star on the galaxy whose peak rises less
than that above its saddle can never head a branch, however much flux it holds. Here
every secondary peak gets its own ``n_levels`` thresholds, spaced exponentially between
half its saddle estimate (the lowest value on the straight line to the nearest brighter
peak; the true saddle is at or above it) and its own peak value: the branch is found
at the first of them where the peak no longer shares a component with any brighter
peak of the footprint, with a resolution set by that peak's own contrast.

Why not photutils: ``deblend_sources`` needs scikit-image (not a dependency here) and
deblends one source at a time in Python with a watershed per source, seconds on a
4k x 4k frame with a few thousand blends. Here all tests of an image are labelled
together: every (secondary peak, threshold) pair is a slice of one 3-D boolean array
per size class of footprint bounding box, and one :func:`scipy.ndimage.label` call
with a structuring element that connects pixels within a slice only (8-connected)
labels every branch of every footprint at every threshold. Branch fluxes are one
``bincount``; nothing loops over pixels, peaks or footprints in Python (only over the
few size classes).

Conventions: flat pixel indices are ``y * nx + x`` of the image (0-based).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

log = logging.getLogger(__name__)

#: the 3-D structuring element: 8-connectivity inside each (peak, threshold) slice, none across slices
_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8[1] = True

#: voxels (slices x box pixels) labelled per ndimage.label call (bounds memory: ~13 bytes each)
_MAX_VOXELS = 1 << 23

#: samples along the segment from a peak to its nearest brighter peak (saddle estimate)
_N_SADDLE = 16


def _classes(n: np.ndarray) -> np.ndarray:
    """Size class of a box side of ``n`` px: the next of 8, 12, 16, 24, 32, 48, ... at or above ``n``."""
    n = np.maximum(np.asarray(n, dtype=np.int64), 1)
    p = np.maximum(3, np.ceil(np.log2(n)).astype(np.int64))
    lo = 3 * (1 << (p - 2))  # 1.5 x 2^(p-1): the half step below 2^p
    return np.where(n <= lo, lo, 1 << p)


def multi_threshold_separate(flat: np.ndarray, lab: np.ndarray, value: np.ndarray, shape: tuple[int, int],
                             peak_flat: np.ndarray, peak_lab: np.ndarray, peak_value: np.ndarray, *,
                             n_levels: int = 16, min_contrast: float = 0.005) -> np.ndarray:
    """Which candidate peaks are separate objects by the multi-threshold criterion (see module doc).

    flat, lab, value: the footprint pixels (sorted flat indices into an image of ``shape``),
    their footprint labels (> 0) and the values deblended (e.g. the matched-filter flux map,
    > 0 in a footprint). peak_flat, peak_lab, peak_value: candidate peaks (flat indices,
    labels, values of the same map). Returns a bool per peak: True for the brightest peak of
    every footprint and for secondary peaks that are separate objects.
    """
    npk = np.size(peak_flat)
    if npk == 0 or min_contrast <= 0:
        return np.ones(npk, dtype=bool)
    # peaks in decreasing value: the first of a footprint is its brightest
    order = np.argsort(-np.asarray(peak_value, dtype=np.float64), kind="stable")
    out = np.ones(npk, dtype=bool)
    out[order] = _separate(np.asarray(flat, dtype=np.int64), np.asarray(lab, dtype=np.int64),
                           np.asarray(value, dtype=np.float64), shape,
                           np.asarray(peak_flat, dtype=np.int64)[order], np.asarray(peak_lab, dtype=np.int64)[order],
                           np.asarray(peak_value, dtype=np.float64)[order], max(2, int(n_levels)), float(min_contrast))
    return out


def _separate(flat, lab, value, shape, pflat, plab, pval, K, min_contrast) -> np.ndarray:
    """:func:`multi_threshold_separate` for peaks sorted by decreasing value."""
    npk = pflat.size
    keep = np.ones(npk, dtype=bool)
    nlab = int(max(lab.max(initial=0), plab.max(initial=0))) + 1
    blended = np.bincount(plab, minlength=nlab) >= 2
    if not blended.any():
        return keep
    ny, nx = shape
    sel = blended[lab]
    flat, lab, value = flat[sel], lab[sel], value[sel]
    py, px = np.divmod(flat, nx)
    # bounding box and total of every blended footprint (arrays of label size)
    big = np.iinfo(np.int64).max
    y0 = np.full(nlab, big)
    x0 = np.full(nlab, big)
    y1 = np.full(nlab, -1)
    x1 = np.full(nlab, -1)
    np.minimum.at(y0, lab, py)
    np.minimum.at(x0, lab, px)
    np.maximum.at(y1, lab, py)
    np.maximum.at(x1, lab, px)
    total = np.bincount(lab, weights=value, minlength=nlab)
    vmin = np.full(nlab, np.inf)
    np.minimum.at(vmin, lab, value)
    # the peaks of blended footprints; secondary = not the first (brightest) of its footprint
    pk = np.flatnonzero(blended[plab])
    first = np.zeros(npk, dtype=bool)
    _, fi = np.unique(plab, return_index=True)
    first[fi] = True
    sec = pk[~first[pk]]
    if sec.size == 0:
        return keep
    pky, pkx = np.divmod(pflat, nx)
    # nearest brighter peak of the same footprint (among the 16 nearest; else the brightest)
    pts = np.column_stack([pkx, pky]).astype(np.float64)
    kq = min(npk, 16)
    dist, idx = cKDTree(pts).query(pts[sec], k=kq)
    dist = dist.reshape(sec.size, kq)
    idx = idx.reshape(sec.size, kq)
    idx_c = np.minimum(idx, npk - 1)
    brighter = (idx < npk) & (idx_c < sec[:, None]) & (plab[idx_c] == plab[sec][:, None])
    dist = np.where(brighter, dist, np.inf)
    jn = np.argmin(dist, axis=1)
    bro = idx_c[np.arange(sec.size), jn]
    brightest = np.zeros(nlab, dtype=np.int64)
    brightest[plab[fi]] = fi
    bro = np.where(np.isfinite(dist[np.arange(sec.size), jn]), bro, brightest[plab[sec]])
    # saddle estimate: the lowest footprint value on the segment to that peak (0 off the footprint)
    t = np.linspace(0.0, 1.0, _N_SADDLE)
    sx = np.rint(pkx[sec][:, None] + (pkx[bro] - pkx[sec])[:, None] * t).astype(np.int64)
    sy = np.rint(pky[sec][:, None] + (pky[bro] - pky[sec])[:, None] * t).astype(np.int64)
    sf = sy * nx + sx
    k = np.clip(np.searchsorted(flat, sf), 0, flat.size - 1)
    on = (flat[k] == sf) & (lab[k] == plab[sec][:, None])
    saddle = np.where(on, value[k], 0.0).min(axis=1)
    # thresholds per secondary peak: exponential from half the saddle estimate (at least the
    # footprint's lowest value) up to just below the peak
    v = pval[sec]
    lo = np.minimum(np.maximum(0.5 * saddle, vmin[plab[sec]]), v)
    lo = np.maximum(lo, 1e-30 * np.maximum(v, 1e-30))
    frac = np.arange(K, dtype=np.float64) / K
    thr = lo[:, None] * (np.maximum(v, lo) / lo)[:, None] ** frac[None, :]
    # brighter peaks of the same footprint as every secondary peak: (secondary, brighter) pairs
    fl = plab[sec]
    by_fp = np.argsort(plab, kind="stable")  # peaks grouped by footprint, brighter first within one
    fp_start = np.searchsorted(plab[by_fp], np.arange(nlab))
    rank = np.empty(npk, dtype=np.int64)
    rank[by_fp] = np.arange(npk) - fp_start[plab[by_fp]]  # position of a peak within its footprint
    n_br = rank[sec]  # the brighter peaks of sec are the first rank[sec] of its footprint
    pair_s = np.repeat(np.arange(sec.size), n_br)
    pair_b = by_fp[fp_start[fl][pair_s] + (np.arange(pair_s.size) - np.repeat(np.cumsum(n_br) - n_br, n_br))]
    # label every (secondary peak, threshold) slice of its footprint's bounding box
    own_lvl = np.full(sec.size, -1, dtype=np.int64)
    f_mine = np.zeros(sec.size)
    f_sib = np.zeros(sec.size)
    hc = _classes(y1[fl] - y0[fl] + 1)
    wc = _classes(x1[fl] - x0[fl] + 1)
    key = hc * (1 << 32) + wc
    order = np.argsort(lab, kind="stable")  # footprint pixels grouped by label
    lab_start = np.searchsorted(lab[order], np.arange(nlab + 1))
    for kk in np.unique(key):
        members = np.flatnonzero(key == kk)
        H, W = int(kk >> 32), int(kk & 0xFFFFFFFF)
        Kc = int(min(K, max(2, _MAX_VOXELS // (H * W))))
        lv = np.round(np.linspace(0, K - 1, Kc)).astype(np.int64)
        per = max(1, _MAX_VOXELS // (Kc * H * W))
        for s in range(0, members.size, per):
            m_idx = members[s:s + per]
            m = m_idx.size
            f_of = fl[m_idx]
            # the footprint pixels of every member (a footprint appears once per secondary peak)
            cnt = lab_start[f_of + 1] - lab_start[f_of]
            rows = np.repeat(np.arange(m), cnt)
            pos = np.arange(rows.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            pix = order[lab_start[f_of][rows] + pos]
            vcube = np.zeros((m, H, W), dtype=np.float32)
            vcube[rows, py[pix] - y0[f_of][rows], px[pix] - x0[f_of][rows]] = value[pix]
            th = thr[m_idx][:, lv].astype(np.float32)
            cube = vcube[:, None, :, :] >= th[:, :, None, None]
            lbl, n = ndimage.label(cube.reshape(m * Kc, H, W), structure=_SLICE_8)
            lbl = lbl.reshape(m, Kc, H, W)
            flux = np.bincount(lbl.ravel(), weights=np.broadcast_to(vcube[:, None], lbl.shape).ravel(),
                               minlength=n + 1)
            flux[0] = 0.0
            ar = np.arange(Kc)
            r = np.arange(m)
            mine = lbl[r[:, None], ar[None, :], (pky[sec[m_idx]] - y0[f_of])[:, None],
                       (pkx[sec[m_idx]] - x0[f_of])[:, None]]
            # shared[i, k]: the peak's component at threshold k holds a brighter peak
            shared = np.zeros((m, Kc), dtype=bool)
            loc = np.full(sec.size, -1, dtype=np.int64)
            loc[m_idx] = r
            pm = loc[pair_s] >= 0
            ps, pb = loc[pair_s[pm]], pair_b[pm]
            lb = lbl[ps[:, None], ar[None, :], (pky[pb] - y0[fl[pair_s[pm]]])[:, None],
                     (pkx[pb] - x0[fl[pair_s[pm]]])[:, None]]
            np.logical_or.at(shared, ps, lb == mine[ps])
            alone = (mine > 0) & ~shared
            has = alone.any(axis=1)
            kk_own = np.argmax(alone, axis=1)
            sib = lbl[r, kk_own, pky[bro[m_idx]] - y0[f_of], pkx[bro[m_idx]] - x0[f_of]]
            own_lvl[m_idx] = np.where(has, lv[kk_own], -1)
            f_mine[m_idx] = np.where(has, flux[mine[r, kk_own]], 0.0)
            f_sib[m_idx] = np.where(has, flux[sib], 0.0)
            del cube, lbl, vcube
    cut = min_contrast * total[fl]
    ok = (own_lvl >= 0) & (f_mine >= cut) & (f_sib >= cut)
    keep[sec] = ok
    log.debug("multi-threshold deblend: %d blended footprints, %d of %d secondary peaks separate",
              int(blended.sum()), int(ok.sum()), sec.size)
    return keep
