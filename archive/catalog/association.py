"""Pure, columnar association of DIASources with DIAObjects (no I/O).

The store backends load the DIAObjects of a batch's sky region (with a margin
around partition borders), call :func:`associate`, and write the result.

Algorithm
---------
1. **Candidates.** Every (source, object) pair closer than the radius is found
   with a HEALPix grid join: objects are ordered by their nested order-29
   index (the store keeps them in that order; otherwise it is computed and
   sorted once); each source looks up the objects in its own order-k cell and
   the 8 neighbouring cells (k chosen so a cell is at least 3 radii wide), and
   exact separations are computed from 3-D unit vectors for those candidates
   only.  Cost is O(sources x local density), independent of the number of
   objects when they arrive sorted; correct at RA 0/360 and at the poles.
2. **Gate.**  A pair may match when its separation is within the source's
   match radius (``radius_arcsec``: 1" by default; a survey's own default where
   the ingest gives one, e.g. 1.5" for ZTF, see :mod:`archive.catalog.alerts`).
   Beyond the radius, a source with measured positional errors may still match
   up to a ceiling (``max_radius_arcsec``, 2") when the offset's chi^2 under
   the combined covariance of source and object is at most ``max_chi2``
   (9.21: 99 % of true pairs, 2 degrees of freedom): imprecise positions reach
   farther, precise ones keep the radius.  The radius is a floor because real
   positions scatter more than their quoted errors (LSST's HiTS DIASources
   pair up to 0.96" apart with median errors of 0.07"): a 5-sigma gate
   shrinking below it split 7 of LSST's 551 HiTS objects.  The chi^2 limit is
   a trade-off measured on simulated fields: a larger one follows imprecise
   positions better in a sparse field and merges neighbours in a crowded one
   (figures at :data:`DEFAULT_MAX_CHI2`).
3. **Scores.**  Without positional errors (or ``use_errors=False``) the cost
   of a pair is its separation in arcsec.  With errors the cost is the
   negative log Gaussian likelihood of the tangent-plane offset under the
   combined covariance of source and object,
   ``0.5*chi2 + 0.5*ln det(S) + ln(2 pi)`` (S in arcsec^2); a row lacking
   errors then uses ``default_err_arcsec``.  ``ra_err`` is the uncertainty
   *on the sky* (of ra*cos(dec), in degrees of arc: what the schema,
   :mod:`archive.process.characterize` and LSST's raErr give) and
   ``ra_dec_cov`` (deg^2) the on-sky covariance; neither is multiplied by
   cos(dec) again.  An object carrying ``pos_sum_w`` (every stored one) has the
   isotropic error 1/sqrt(pos_sum_w).
4. **Assignment.** An object takes at most one source per visit.  Within a
   visit the assignment is globally optimal: the largest number of pairs is
   matched and, among those, the total cost is minimal (a min-weight full
   bipartite matching with "unmatched" dummies; see :func:`optimal_matching`).
   Components where one source and one object only see each other (the
   common case) are matched directly, vectorized; only the ambiguous edges
   go to the sparse solver (scipy LAPJVsp).
5. **Duplicates of a visit** (``same_visit="attach"``, the DIASource rule).
   Surveys sometimes measure one object twice on one difference image (ZTF
   alert packets hold pairs of candidates 0.2" apart from one image).  Such a
   second source must not found a twin object that then splits the light
   curve.  A source left unmatched that lies within the gate of an object
   that took a source of the same visit is **attached** to it (the cheapest
   such object) and flagged a duplicate (``AssociationResult.duplicate``; the
   store sets :data:`DUPLICATE_FLAG` in ``dia_source.flags``).  Likewise among
   the unmatched sources of a visit that would found new objects: taken in a
   fixed order (most precise position, then highest ``snr``, then smallest
   ``dia_source_id`` -- never the arrival order), a source within the gate of
   an object founded before it in the visit is attached to that one.  A
   duplicate keeps its row and its ``dia_object_id`` (it is in the object's
   light curve) but does not enter the object's summaries or position: the
   object has one detection per visit in its statistics.  Direct-image
   matching (:mod:`archive.catalog.matched`, where two sources of one epoch
   are two stars) uses ``same_visit="found"``: they found two objects.
6. **Several visits in one batch** are associated as successive rounds in time
   order (by the smallest ``mjd`` of the visit when given, else by visit
   number; ties by visit number).  A source left unmatched founds a new object
   positioned at that source; later rounds can match it.  Between rounds,
   every object that took a source moves to the weighted mean of its unit
   vectors and gets the isotropic error 1/sqrt(sum w), exactly as
   :mod:`archive.catalog.summaries` stores it, so a batch of several visits
   associates like the same visits one at a time.  The store relies on this
   to make the objects independent of the order visits arrive in
   (:mod:`archive.catalog.dia_ingest`: a late visit re-associates the affected
   objects' later sources in time order).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import healpy as hp
import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from archive.catalog.ids import new_ids
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_healpix29, radec_to_vec, vec_to_radec

log = logging.getLogger(__name__)

_ARCSEC_RAD = np.pi / (180.0 * 3600.0)
_LOG_2PI = float(np.log(2.0 * np.pi))


# --------------------------------------------------------------------------- geometry
def _grid_order(radius_arcsec: float) -> int:
    """Largest HEALPix order whose pixels are at least 3 radii wide (<= 29).

    A pixel's narrowest width is more than half its mean size (also in the
    polar caps), so any point within the radius of a source lies in the
    source's pixel or one of its 8 neighbours.
    """
    for k in range(29, -1, -1):
        if hp.nside2resol(1 << k) / _ARCSEC_RAD >= 3.0 * radius_arcsec:
            return k
    return 0


def _check_positions(ra: np.ndarray, dec: np.ndarray, what: str) -> None:
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValidationError(
            f"{what}: ra/dec must be finite degrees with |dec| <= 90; bad rows (positional) {rows}"
            f"{' ...' if bad.sum() > 5 else ''}")


def candidate_pairs(src_ra: np.ndarray, src_dec: np.ndarray,
                    obj_ra: np.ndarray, obj_dec: np.ndarray,
                    radius_arcsec: float, *,
                    obj_healpix29: np.ndarray | None = None,
                    src_healpix29: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (source, object) pairs with angular separation <= ``radius_arcsec``.

    Positions in degrees.  ``obj_healpix29`` (nested order 29, as stored) makes
    the join cheaper: when it is already sorted, no sort is needed at all.

    Returns ``(src_idx, obj_idx, sep_arcsec)``: int64 positional indices into
    the inputs and the separations in arcsec, ordered by source index.
    """
    if radius_arcsec <= 0:
        raise ValidationError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    src_ra = np.asarray(src_ra, dtype=np.float64)
    src_dec = np.asarray(src_dec, dtype=np.float64)
    obj_ra = np.asarray(obj_ra, dtype=np.float64)
    obj_dec = np.asarray(obj_dec, dtype=np.float64)
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    if src_ra.size == 0 or obj_ra.size == 0:
        return empty
    k = _grid_order(radius_arcsec)
    shift = 2 * (29 - k)
    if obj_healpix29 is None:
        obj_healpix29 = radec_to_healpix29(obj_ra, obj_dec)
    obj_hp = np.asarray(obj_healpix29, dtype=np.int64)
    if obj_hp.size > 1 and not bool((obj_hp[1:] >= obj_hp[:-1]).all()):
        order = np.argsort(obj_hp, kind="stable")
        obj_hp = obj_hp[order]
    else:
        order = None
    if src_healpix29 is None:
        src_cell = np.asarray(hp.ang2pix(1 << k, src_ra, src_dec, nest=True, lonlat=True),
                              dtype=np.int64)
    else:
        src_cell = np.asarray(src_healpix29, dtype=np.int64) >> shift
    # visit the sources in cell order: each of the 9 rows of cells (own cell and
    # 8 neighbours) is then nearly sorted, which keeps searchsorted cache friendly
    by_cell = np.argsort(src_cell)
    src_cell = src_cell[by_cell]
    nbr = np.asarray(hp.get_all_neighbours(1 << k, src_cell, nest=True), dtype=np.int64)
    cells = np.vstack([src_cell[None, :], nbr.reshape(8, -1)])  # (9, n)
    cell_src = np.broadcast_to(by_cell, cells.shape).ravel()
    cells = cells.ravel()
    valid = cells >= 0  # missing neighbours (-1) at some base-pixel corners
    cells, cell_src = cells[valid], cell_src[valid]
    # an order-k cell c holds the order-29 indices [c << shift, (c + 1) << shift)
    lo = np.searchsorted(obj_hp, cells << shift, side="left")
    hi = np.searchsorted(obj_hp, (cells + 1) << shift, side="left")
    counts = hi - lo
    total = int(counts.sum())
    if total == 0:
        return empty
    keep = counts > 0
    counts, lo, cell_src = counts[keep], lo[keep], cell_src[keep]
    starts = np.cumsum(counts) - counts
    pos = np.arange(total, dtype=np.int64) - np.repeat(starts - lo, counts)
    s_idx = np.repeat(cell_src, counts)
    o_idx = order[pos] if order is not None else pos
    # cheap cut in declination before any trigonometry
    r_deg = radius_arcsec / 3600.0
    near = np.abs(obj_dec[o_idx] - src_dec[s_idx]) <= r_deg * (1.0 + 1e-9) + 1e-12
    s_idx, o_idx = s_idx[near], o_idx[near]
    us = radec_to_vec(src_ra, src_dec)[s_idx]
    d = us - radec_to_vec(obj_ra[o_idx], obj_dec[o_idx])
    chord2 = np.einsum("ij,ij->i", d, d)
    chord_r = 2.0 * np.sin(0.5 * radius_arcsec * _ARCSEC_RAD)
    ok = chord2 <= chord_r * chord_r
    s_idx, o_idx = s_idx[ok], o_idx[ok]
    sep = 2.0 * np.arcsin(0.5 * np.sqrt(chord2[ok])) / _ARCSEC_RAD
    srt = np.lexsort((o_idx, s_idx))
    return s_idx[srt], o_idx[srt], sep[srt]


def tangent_offsets(src_ra: np.ndarray, src_dec: np.ndarray,
                    obj_ra: np.ndarray, obj_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (east, north) in arcsec of sources from objects, in the object's tangent plane."""
    d = radec_to_vec(src_ra, src_dec) - radec_to_vec(obj_ra, obj_dec)
    a = np.radians(np.asarray(obj_ra, np.float64))
    b = np.radians(np.asarray(obj_dec, np.float64))
    sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
    dx = -sa * d[:, 0] + ca * d[:, 1]
    dy = -sb * ca * d[:, 0] - sb * sa * d[:, 1] + cb * d[:, 2]
    return dx / _ARCSEC_RAD, dy / _ARCSEC_RAD


# --------------------------------------------------------------------------- errors
# --------------------------------------------------------------------------- errors
def _num_col(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df.columns:
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _cov_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tangent-plane covariance (xx east, yy north, xy) per row in arcsec^2; NaN where unknown.

    ``ra_err`` is the error *on the sky* (of ra*cos(dec), degrees of arc) and
    ``ra_dec_cov`` the on-sky covariance (deg^2): neither is multiplied by
    cos(dec) here (issue 15, item 3).
    """
    n = len(df)
    if "ra_err" not in df.columns or "dec_err" not in df.columns:
        return np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    sx = _num_col(df, "ra_err") * 3600.0
    sy = _num_col(df, "dec_err") * 3600.0
    cov = _num_col(df, "ra_dec_cov")
    cxy = np.where(np.isfinite(cov), cov * 3600.0 ** 2, 0.0)
    return sx * sx, sy * sy, cxy


def _has_errors(cov: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    xx, yy, _ = cov
    return np.isfinite(xx) & np.isfinite(yy) & (xx > 0) & (yy > 0)


def _fill_cov(xx: np.ndarray, yy: np.ndarray, xy: np.ndarray,
              default_var: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bad = ~(np.isfinite(xx) & np.isfinite(yy) & (xx > 0) & (yy > 0))
    return (np.where(bad, default_var, xx), np.where(bad, default_var, yy),
            np.where(bad | ~np.isfinite(xy), 0.0, xy))


def _object_state(objects: pd.DataFrame, rows: np.ndarray, default_var: float
                  ) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """Covariance (arcsec^2) and position weight (arcsec^-2) of the object rows ``rows``
    (positional; only the candidates are computed, not every object of the footprint).

    Objects stored by the archive carry ``pos_sum_w`` (deg^-2): their error is
    the isotropic 1/sqrt(pos_sum_w), taken from that float64 sum (the stored
    float32 ``ra_err``/``dec_err`` are the same value rounded), so stored
    objects and objects moved in memory between the visits of one batch score
    identically.  Other objects use ``ra_err``/``dec_err``/``ra_dec_cov``, or
    ``default_var`` per axis, and the weight 2/(xx + yy).
    """
    def col(name: str) -> np.ndarray:
        if name not in objects.columns:
            return np.full(rows.size, np.nan)
        return pd.to_numeric(objects[name], errors="coerce").to_numpy(
            np.float64, na_value=np.nan)[rows]

    if "ra_err" in objects.columns and "dec_err" in objects.columns:
        sx, sy, cov = col("ra_err") * 3600.0, col("dec_err") * 3600.0, col("ra_dec_cov")
        raw = (sx * sx, sy * sy, np.where(np.isfinite(cov), cov * 3600.0 ** 2, 0.0))
    else:
        raw = (np.full(rows.size, np.nan), np.full(rows.size, np.nan), np.zeros(rows.size))
    xx, yy, xy = _fill_cov(*raw, default_var)
    w = col("pos_sum_w") / 3600.0 ** 2
    ok = np.isfinite(w) & (w > 0)
    iso = np.where(ok, 1.0 / np.where(ok, w, 1.0), np.nan)
    xx, yy, xy = np.where(ok, iso, xx), np.where(ok, iso, yy), np.where(ok, 0.0, xy)
    return (xx, yy, xy), np.where(ok, w, 2.0 / (xx + yy))


def _chi2_logdet(dx: np.ndarray, dy: np.ndarray, xx: np.ndarray, yy: np.ndarray,
                 xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """chi^2 of offsets (arcsec) under covariances (arcsec^2), and ln det of the covariance."""
    det = xx * yy - xy * xy
    bad = ~(det > 0)
    if bad.any():  # inconsistent covariances: drop the correlation
        xy = np.where(bad, 0.0, xy)
        det = xx * yy - xy * xy
    chi2 = (yy * dx * dx - 2.0 * xy * dx * dy + xx * dy * dy) / det
    return chi2, np.log(det)


def _pair_costs(scoring: str, sep: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                scov: tuple[np.ndarray, np.ndarray, np.ndarray],
                tcov: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cost per pair -- separation (arcsec), or -ln Gaussian likelihood of the offset -- and
    the pair's chi^2 under the combined covariance."""
    chi2, logdet = _chi2_logdet(dx, dy, scov[0] + tcov[0], scov[1] + tcov[1], scov[2] + tcov[2])
    if scoring == "distance":
        return sep.copy(), chi2
    return 0.5 * chi2 + 0.5 * logdet + _LOG_2PI, chi2


def _offsets_vec(us: np.ndarray, ut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(east, north) offsets in arcsec of unit vectors ``us`` from unit vectors ``ut``."""
    d = us - ut
    a = np.arctan2(ut[:, 1], ut[:, 0])
    b = np.arctan2(ut[:, 2], np.hypot(ut[:, 0], ut[:, 1]))
    sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
    dx = -sa * d[:, 0] + ca * d[:, 1]
    dy = -sb * ca * d[:, 0] - sb * sa * d[:, 1] + cb * d[:, 2]
    return dx / _ARCSEC_RAD, dy / _ARCSEC_RAD


def _chord_to_arcsec(chord: np.ndarray) -> np.ndarray:
    return 2.0 * np.arcsin(np.minimum(0.5 * chord, 1.0)) / _ARCSEC_RAD


# --------------------------------------------------------------------------- matching
def optimal_matching(src: np.ndarray, obj: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Choose edges of a bipartite graph: maximum cardinality, then minimum total cost.

    Parameters: ``src``, ``obj`` node labels (any int64 values) of each edge and
    its ``cost`` (any finite float; an edge must appear once).  Returns a
    boolean mask over the edges: the chosen matching (each source and each
    object in at most one chosen edge).

    Edges whose source and object both have degree one are taken directly
    (vectorized).  The rest are solved at once as a min-weight *full*
    matching of a sparse graph augmented with "unmatched" dummies: source i
    may take its own dummy column and object j its own dummy row, each at cost
    BIG, and for every real edge (i, j) the dummies of j and i may pair at a
    small cost; so a full matching always exists, every unmatched node costs
    BIG and, with BIG larger than any possible difference of real costs, the
    solution has the most matches and, among those, the least total cost.
    """
    src = np.asarray(src, dtype=np.int64)
    obj = np.asarray(obj, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    chosen = np.zeros(src.size, dtype=bool)
    if src.size == 0:
        return chosen
    if not np.all(np.isfinite(cost)):
        raise ValidationError("optimal_matching: costs must be finite")
    _, s = np.unique(src, return_inverse=True)
    _, o = np.unique(obj, return_inverse=True)
    ds = np.bincount(s)
    do = np.bincount(o)
    simple = (ds[s] == 1) & (do[o] == 1)
    chosen[simple] = True
    amb = np.flatnonzero(~simple)
    if amb.size == 0:
        return chosen
    us, s2 = np.unique(s[amb], return_inverse=True)
    uo, o2 = np.unique(o[amb], return_inverse=True)
    ns, no = us.size, uo.size
    c = cost[amb]
    c = c - c.min() + 1.0  # positive, non-zero weights (LAPJVsp treats zeros as absent)
    big = (float(c.max()) + 1.0) * (min(ns, no) + 2) * 2.0
    ne = amb.size
    # rows: sources 0..ns-1, object dummies ns..ns+no-1
    # cols: objects 0..no-1, source dummies no..no+ns-1
    rows = np.concatenate([s2, np.arange(ns), ns + np.arange(no), ns + o2])
    cols = np.concatenate([o2, no + np.arange(ns), np.arange(no), no + s2])
    w = np.concatenate([c, np.full(ns, big), np.full(no, big), np.full(ne, 1.0)])
    g = sparse.csr_array((w, (rows, cols)), shape=(ns + no, ns + no))
    r, cidx = min_weight_full_bipartite_matching(g)
    real = (r < ns) & (cidx < no)
    # map chosen (s2, o2) back to edges
    key_edges = s2.astype(np.int64) * no + o2
    key_sel = r[real].astype(np.int64) * no + cidx[real]
    pos = np.searchsorted(np.sort(key_edges), key_sel)
    edge_order = np.argsort(key_edges)
    chosen[amb[edge_order[pos]]] = True
    return chosen




# --------------------------------------------------------------------------- associate
#: Default match radius (arcsec): the gate's floor -- pairs at most this far apart always
#: pass -- for sources without a survey default.
DEFAULT_RADIUS_ARCSEC = 1.0
#: Default ceiling (arcsec): beyond the radius, a pair passes only within this distance
#: and a chi^2 within :data:`DEFAULT_MAX_CHI2`; never beyond it.
DEFAULT_MAX_RADIUS_ARCSEC = 2.0
#: Default chi^2 gate beyond the radius (2 degrees of freedom: 99 % of true pairs pass).
#: Measured on simulated fields (tests/catalog/arrival.py), exact groupings: a sparse field
#: with 0.3-0.8" errors 0.13 (radius alone) -> 0.86 (9.21) / 0.88 (25); a crowded one
#: (0.2 neighbours within 1", 0.05-0.35" errors) 0.79 -> 0.77 (9.21) / 0.63 (25).
DEFAULT_MAX_CHI2 = 9.21
#: Bit set in ``dia_source.flags`` of a source attached as a duplicate of its object's visit
#: (another source of the same visit is that object's detection for the visit).  The low
#: bits of ``flags`` are mask planes, measurement flags start at bit 32, calibration flags
#: at 48; association flags at 56.
DUPLICATE_FLAG = np.int64(1) << np.int64(56)


@dataclass
class AssociationResult:
    """Outcome of :func:`associate`, aligned with the rows of ``sources``.

    Attributes
    ----------
    dia_object_id : int64, the object each source belongs to (existing or new).
    is_new : bool, True where the source founded a new object.
    distance_arcsec : float64, separation from the matched object (NaN if new);
        for a duplicate, from the object's position (or its founder's).
    object_index : int64, positional row in ``objects`` of the matched object,
        -1 for new objects (founded by this source or by an earlier source of
        the batch).
    cost : float64, score of the chosen pair (NaN if new).
    scoring : ``"distance"`` or ``"likelihood"``.
    duplicate : bool, True where the source was attached to an object that
        already took another source of the same visit (it does not enter the
        object's summaries; see the module docstring).
    """

    dia_object_id: np.ndarray
    is_new: np.ndarray
    distance_arcsec: np.ndarray
    object_index: np.ndarray
    cost: np.ndarray
    scoring: str
    duplicate: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.duplicate is None:
            self.duplicate = np.zeros(self.is_new.size, dtype=bool)

    @property
    def n_new(self) -> int:
        return int(self.is_new.sum())

    @property
    def n_matched(self) -> int:
        return int(self.is_new.size - self.is_new.sum())

    @property
    def n_duplicates(self) -> int:
        return int(self.duplicate.sum())


def _column(df: pd.DataFrame, name: str, what: str, dtype=np.float64) -> np.ndarray:
    if name not in df.columns:
        raise ValidationError(f"{what}: missing column {name!r} (have {list(df.columns)})")
    try:
        return df[name].to_numpy(dtype)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what}: column {name!r} is not numeric/complete: {exc}") from None


def _rounds(sources: pd.DataFrame) -> np.ndarray:
    """Round number per source (0-based, time order of its visit).

    Visits are ordered by the smallest ``mjd`` of their rows, ties by visit
    number: the order a time-ordered ingest would see them in.
    """
    n = len(sources)
    key_col = "visit" if "visit" in sources.columns else (
        "exposure_id" if "exposure_id" in sources.columns else None)
    if key_col is None or n == 0:
        return np.zeros(n, dtype=np.int64)
    key = sources[key_col].to_numpy()
    if pd.isna(key).any():
        raise ValidationError(f"sources: column {key_col!r} has missing values")
    uniq, inv = np.unique(key, return_inverse=True)
    if "mjd" in sources.columns:
        mjd = _num_col(sources, "mjd")
        tmin = np.full(uniq.size, np.inf)
        np.minimum.at(tmin, inv, np.where(np.isfinite(mjd), mjd, np.inf))
        order = np.lexsort((np.arange(uniq.size), tmin))
    else:
        order = np.arange(uniq.size)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[order] = np.arange(uniq.size)
    return rank[inv.ravel()]


def _priority(sources: pd.DataFrame, rows: np.ndarray, w_src: np.ndarray, src_ra: np.ndarray,
              src_dec: np.ndarray) -> np.ndarray:
    """Rank of the sources ``rows`` as founders of new objects among same-visit neighbours
    (0 = first): the most precise position first, then the highest ``snr``, then the
    smallest ``dia_source_id``, then position -- never the row order, so the choice does
    not depend on how the rows arrived."""
    snr = _num_col(sources, "snr")[rows] if "snr" in sources.columns else np.zeros(rows.size)
    ids = (sources["dia_source_id"].to_numpy(np.float64, na_value=np.nan)[rows]
           if "dia_source_id" in sources.columns else np.zeros(rows.size))
    order = np.lexsort((src_ra[rows], src_dec[rows], ids, -np.nan_to_num(snr, nan=-np.inf),
                        -w_src[rows]))
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    return rank


@dataclass
class _Ctx:
    """Per-batch arrays shared by the rounds (internal)."""

    src_ra: np.ndarray
    src_dec: np.ndarray
    src_u: np.ndarray
    s_cov: tuple[np.ndarray, np.ndarray, np.ndarray]
    s_err: np.ndarray          # source has measured errors
    radius: np.ndarray         # per-source floor of the gate (arcsec)
    ceil: np.ndarray           # per-source ceiling (arcsec), >= radius
    max_chi2: float | None
    scoring: str
    attach: bool
    sources: pd.DataFrame      # for the founders' ranking (:func:`_priority`)
    w_src: np.ndarray
    no: int
    target: np.ndarray         # object row, or no + founding source row; -1 unassigned
    dist: np.ndarray
    cost: np.ndarray
    founder: np.ndarray
    dup: np.ndarray

    def gate(self, es: np.ndarray, sep: np.ndarray, chi2: np.ndarray) -> np.ndarray:
        """Which candidate pairs may match: within the source's radius; or, for a
        source with measured errors (scored by likelihood), within the ceiling and
        chi^2 <= max_chi2 under the combined covariance of both sides."""
        ok = sep <= self.radius[es]
        if self.max_chi2 is not None and self.scoring == "likelihood":
            ok |= (sep <= self.ceil[es]) & self.s_err[es] & (chi2 <= self.max_chi2)
        return ok


def _score(ctx: _Ctx, es: np.ndarray, us_t: np.ndarray, sep: np.ndarray,
           tcov: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Gate mask and cost of pairs (sources ``es``, targets at unit vectors ``us_t``)."""
    dx, dy = _offsets_vec(ctx.src_u[es], us_t)
    c, chi2 = _pair_costs(ctx.scoring, sep, dx, dy, tuple(x[es] for x in ctx.s_cov), tcov)
    return ctx.gate(es, sep, chi2), c


def _resolve_round(ctx: _Ctx, members: np.ndarray, es: np.ndarray, gt: np.ndarray,
                   sep: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign one visit's sources given its gated candidate edges (source ``es`` ->
    global target ``gt``: an object row, or ``no +`` the row of an earlier founder).

    1. an optimal matching (most pairs, then least cost) -- each target takes at
       most one source of the visit;
    2. with ``attach``: a source left over that has candidates (all of them were
       taken, or the matching would have used one) is attached to its cheapest
       one as a duplicate of that visit;
    3. the rest found new objects, except (``attach``) a source within the gate of
       another founder of the same visit ranking before it (:func:`_priority`),
       which becomes a duplicate of that founder's new object.

    Returns ``(matched sources, their targets, new founders)``.
    """
    pick = optimal_matching(es, gt, c)
    ms, mt = es[pick], gt[pick]
    ctx.target[ms] = mt
    ctx.dist[ms] = sep[pick]
    ctx.cost[ms] = c[pick]
    left = members[ctx.target[members] < 0]
    if ctx.attach and left.size:
        is_left = np.zeros(ctx.target.size, dtype=bool)
        is_left[left] = True
        e = np.flatnonzero(is_left[es])
        if e.size:
            e = e[np.lexsort((gt[e], c[e], es[e]))]
            e = e[np.r_[True, es[e][1:] != es[e][:-1]]]  # cheapest edge per source
            ctx.target[es[e]] = gt[e]
            ctx.dist[es[e]] = sep[e]
            ctx.cost[es[e]] = c[e]
            ctx.dup[es[e]] = True
            left = left[ctx.target[left] < 0]
        if left.size > 1:
            _cluster_founders(ctx, left)
            left = left[ctx.target[left] < 0]
    ctx.founder[left] = True
    return ms, mt, left


def _cluster_founders(ctx: _Ctx, rows: np.ndarray) -> None:
    """Among would-be founders of one visit, keep one per group within the gate.

    Taken in :func:`_priority` order, a source founds an object unless it lies
    within the gate of an object founded before it in this visit (its position
    and errors are its founder's), in which case it is attached to the cheapest
    such founder as a duplicate.  Decided in a few vectorized sweeps: a source is
    decided once every higher-ranked neighbour is.
    """
    rmax = float(ctx.ceil[rows].max())
    a, b, sep = candidate_pairs(ctx.src_ra[rows], ctx.src_dec[rows], ctx.src_ra[rows],
                                ctx.src_dec[rows], rmax)
    a, b = rows[a], rows[b]
    rank = np.full(ctx.src_ra.size, -1, dtype=np.int64)
    rank[rows] = _priority(ctx.sources, rows, ctx.w_src, ctx.src_ra, ctx.src_dec)
    keep = rank[b] < rank[a]  # edge: a may be a duplicate of the better-ranked b
    a, b, sep = a[keep], b[keep], sep[keep]
    if a.size == 0:
        return
    ok, c = _score(ctx, a, ctx.src_u[b], sep, tuple(x[b] for x in ctx.s_cov))
    a, b, sep, c = a[ok], b[ok], sep[ok], c[ok]
    if a.size == 0:
        return
    loc = pd.Index(rows)
    la, lb = loc.get_indexer(a), loc.get_indexer(b)
    state = np.zeros(rows.size, dtype=np.int8)  # 0 undecided, 1 founder, 2 duplicate
    has_edge = np.bincount(la, minlength=rows.size) > 0
    state[~has_edge] = 1
    while (state == 0).any():
        sb = state[lb]
        n_found = np.bincount(la, weights=(sb == 1), minlength=rows.size)
        n_open = np.bincount(la, weights=(sb == 0), minlength=rows.size)
        und = state == 0
        state[und & (n_found > 0)] = 2
        state[und & (n_found == 0) & (n_open == 0)] = 1
    e = np.flatnonzero((state[la] == 2) & (state[lb] == 1))
    e = e[np.lexsort((b[e], c[e], a[e]))]
    e = e[np.r_[True, a[e][1:] != a[e][:-1]]]
    ctx.target[a[e]] = ctx.no + b[e]
    ctx.dist[a[e]] = sep[e]
    ctx.cost[a[e]] = c[e]
    ctx.dup[a[e]] = True


def _rounds_loop(ctx: _Ctx, src_hp, w_src, rounds, n_rounds, obj_ra, obj_dec, obj_hp,
                 objects, default_var) -> None:
    """Associate visit by visit, updating object positions between visits.

    Targets are the given objects (0..no-1) and every source as a potential
    founder of a new object (no + i).  After each visit, a target that took a
    source (duplicates excepted) moves to the weighted mean of its unit vectors
    and gets the isotropic error 1/sqrt(sum w), exactly as the summaries would
    give; so a batch of several visits associates like the same visits one at a
    time.  Candidates come from a pool with twice the largest ceiling; if a
    target drifts by more than one ceiling the pool is rebuilt from the current
    positions.
    """
    src_ra, src_dec, src_u, no = ctx.src_ra, ctx.src_dec, ctx.src_u, ctx.no
    ns = src_ra.size
    rmax = float(ctx.ceil.max())
    pool_r = 2.0 * rmax
    margin = 2.0 * np.sin(0.5 * rmax * _ARCSEC_RAD)

    def build_pool(first_round: int, t_ra, t_dec, t_hp):
        rem = np.flatnonzero(rounds >= first_round)
        s, t, _ = candidate_pairs(src_ra[rem], src_dec[rem], t_ra, t_dec, pool_r,
                                  obj_healpix29=t_hp,
                                  src_healpix29=None if src_hp is None else src_hp[rem])
        return rem[s], t

    s1, t1 = build_pool(0, obj_ra, obj_dec, obj_hp)
    s2, t2 = build_pool(0, src_ra, src_dec, src_hp)
    # a source is a target only from a later visit than its own
    later = rounds[t2] < rounds[s2]
    s2, t2 = s2[later], t2[later]
    ps = np.concatenate([s1, s2])
    pt = np.concatenate([t1, no + t2])
    # compact state over the targets that can ever be reached
    tid, pt_local = np.unique(pt, return_inverse=True)
    nt = tid.size
    is_obj = tid < no
    tu = np.empty((nt, 3))
    tu[is_obj] = radec_to_vec(obj_ra[tid[is_obj]], obj_dec[tid[is_obj]])
    tu[~is_obj] = src_u[tid[~is_obj] - no]
    txx, tyy, txy = np.empty(nt), np.empty(nt), np.zeros(nt)
    sw = np.zeros(nt)
    if is_obj.any():
        rows = tid[is_obj]
        (txx[is_obj], tyy[is_obj], txy[is_obj]), sw[is_obj] = _object_state(objects, rows,
                                                                             default_var)
    swv = tu * sw[:, None]
    base = tu.copy()
    local_of = np.full(no + ns, -1, dtype=np.int64)
    local_of[tid] = np.arange(nt)

    order = np.argsort(rounds[ps], kind="stable")
    ps, pt_local = ps[order], pt_local[order]
    bounds = np.searchsorted(rounds[ps], np.arange(n_rounds + 1))
    src_by_round = np.argsort(rounds, kind="stable")
    br = np.searchsorted(rounds[src_by_round], np.arange(n_rounds + 1))
    chord_r2 = (2.0 * np.sin(0.5 * ctx.ceil * _ARCSEC_RAD)) ** 2  # per source
    for r in range(n_rounds):
        e = np.arange(bounds[r], bounds[r + 1])
        es, et = ps[e], pt_local[e]
        gt = tid[et]
        usable = (gt < no) | ctx.founder[np.maximum(gt - no, 0)]
        es, et = es[usable], et[usable]
        d = src_u[es] - tu[et]
        c2 = np.einsum("ij,ij->i", d, d)
        near = c2 <= chord_r2[es]
        es, et, c2 = es[near], et[near], c2[near]
        sep = _chord_to_arcsec(np.sqrt(c2))
        ok, c = _score(ctx, es, tu[et], sep, (txx[et], tyy[et], txy[et]))
        es, et, sep, c = es[ok], et[ok], sep[ok], c[ok]
        members = src_by_round[br[r]:br[r + 1]]
        ms, mt_g, new = _resolve_round(ctx, members, es, tid[et], sep, c)
        mt = local_of[mt_g]
        # update the state of the targets that took a source, and of new objects
        sw[mt] += w_src[ms]
        swv[mt] += src_u[ms] * w_src[ms][:, None]
        lf = local_of[no + new]
        lf_ok = lf >= 0
        sw[lf[lf_ok]] = w_src[new[lf_ok]]
        swv[lf[lf_ok]] = src_u[new[lf_ok]] * w_src[new[lf_ok]][:, None]
        upd = np.concatenate([mt, lf[lf_ok]])
        if upd.size:
            v = swv[upd]
            tu[upd] = v / np.linalg.norm(v, axis=1)[:, None]
            iso = 1.0 / sw[upd]
            txx[upd], tyy[upd], txy[upd] = iso, iso, 0.0
            moved = np.einsum("ij,ij->i", tu[upd] - base[upd], tu[upd] - base[upd])
            if r + 1 < n_rounds and (moved > margin * margin).any():
                # rebuild the pool for the remaining visits from current positions
                log.debug("association: a target drifted beyond the pool margin; "
                          "candidate pool rebuilt after round %d", r)
                t_ra, t_dec = vec_to_radec(tu)
                s3, t3 = build_pool(r + 1, t_ra, t_dec, None)
                keep = rounds[ps] <= r
                ps = np.concatenate([ps[keep], s3])
                pt_local = np.concatenate([pt_local[keep], t3])
                order = np.argsort(rounds[ps], kind="stable")
                ps, pt_local = ps[order], pt_local[order]
                bounds = np.searchsorted(rounds[ps], np.arange(n_rounds + 1))
                base = tu.copy()


def associate(sources: pd.DataFrame, objects: pd.DataFrame,
              radius_arcsec: float | np.ndarray = DEFAULT_RADIUS_ARCSEC,
              use_errors: bool = True, *, default_err_arcsec: float = 0.1,
              max_radius_arcsec: float = DEFAULT_MAX_RADIUS_ARCSEC,
              max_chi2: float | None = DEFAULT_MAX_CHI2,
              same_visit: str = "attach",
              id_factory: Callable[[int], np.ndarray] = new_ids) -> AssociationResult:
    """Associate a batch of DIASources with known DIAObjects (pure, no I/O).

    Parameters
    ----------
    sources : DataFrame with ``ra``, ``dec`` (deg); optional ``ra_err``,
        ``dec_err`` (deg, on the sky), ``ra_dec_cov`` (deg^2), ``visit`` (or
        ``exposure_id``), ``mjd``, ``snr``, ``dia_source_id``.  Sources of one
        visit compete for objects; different visits are separate rounds in
        time order (without ``visit``/``exposure_id`` the batch is one visit).
        An optional ``healpix29`` column is used instead of recomputing it.
    objects : DataFrame with ``dia_object_id``, ``ra``, ``dec`` (deg); optional
        ``pos_sum_w`` (deg^-2; the stored running weight, preferred), else
        ``ra_err``, ``dec_err``, ``ra_dec_cov``; ``healpix29`` (fastest when
        sorted by it, as the store keeps them).  May be empty.
    radius_arcsec : match radius (arcsec), one value or one per source: the
        gate's floor, pairs at most this far apart may always match.
    use_errors : score pairs by Gaussian likelihood (and apply the chi^2 gate)
        when error columns exist; otherwise (or if False) by separation.
    default_err_arcsec : per-axis positional error (arcsec) assumed for rows
        without errors when scoring by likelihood.
    max_radius_arcsec : the gate's ceiling (arcsec): beyond the radius, a
        source with measured errors may match a target up to this far away
        when the offset's chi^2 under the combined covariance of both sides is
        <= ``max_chi2`` (so imprecise positions reach farther, precise ones
        keep the radius).  Pairs beyond it never match.
    max_chi2 : that chi^2 limit (2 degrees of freedom); None: the radius alone.
    same_visit : ``"attach"`` (DIASources): a source within the gate of an
        object that already took a source of its visit -- or of a better-ranked
        source of the visit that founds one -- is attached to it as a
        duplicate (``result.duplicate``) instead of founding a twin;
        ``"found"`` (direct-image matching, where two sources of one epoch are
        two stars): it founds a new object.
    id_factory : ``n -> int64 ids`` for new objects (default :func:`new_ids`).

    Returns
    -------
    AssociationResult aligned with ``sources`` rows.
    """
    if same_visit not in ("attach", "found"):
        raise ValidationError(f"same_visit must be 'attach' or 'found', got {same_visit!r}")
    ns = len(sources)
    src_ra = _column(sources, "ra", "sources")
    src_dec = _column(sources, "dec", "sources")
    _check_positions(src_ra, src_dec, "sources")
    radius = np.broadcast_to(np.asarray(radius_arcsec, dtype=np.float64), (ns,)).copy()
    if ns and not (np.isfinite(radius).all() and (radius > 0).all()):
        raise ValidationError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    if not np.ndim(radius_arcsec) and not float(radius_arcsec) > 0:
        raise ValidationError(f"radius_arcsec must be > 0, got {radius_arcsec}")
    if not (np.isfinite(max_radius_arcsec) and max_radius_arcsec > 0):
        raise ValidationError(f"max_radius_arcsec must be > 0, got {max_radius_arcsec}")
    if max_chi2 is not None and not max_chi2 > 0:
        raise ValidationError(f"max_chi2 must be > 0 or None, got {max_chi2}")
    no = len(objects)
    if no:
        obj_ra = _column(objects, "ra", "objects")
        obj_dec = _column(objects, "dec", "objects")
        obj_id = _column(objects, "dia_object_id", "objects", np.int64)
        _check_positions(obj_ra, obj_dec, "objects")
    else:
        obj_ra = obj_dec = np.empty(0)
        obj_id = np.empty(0, np.int64)
    src_hp = sources["healpix29"].to_numpy(np.int64) if (
        "healpix29" in sources.columns and not sources["healpix29"].isna().any()) else None
    obj_hp = objects["healpix29"].to_numpy(np.int64) if (
        no and "healpix29" in objects.columns and not objects["healpix29"].isna().any()) else None

    default_var = float(default_err_arcsec) ** 2
    if not default_var > 0:
        raise ValidationError(f"default_err_arcsec must be > 0, got {default_err_arcsec}")
    s_cov_raw = _cov_arrays(sources)
    s_err = _has_errors(s_cov_raw)
    o_has = no and any(c in objects.columns and bool(objects[c].notna().any())
                       for c in ("pos_sum_w", "ra_err"))
    scoring = "likelihood" if (use_errors and (s_err.any() or o_has)) else "distance"
    s_cov = _fill_cov(*s_cov_raw, default_var)
    # position weight of a source (arcsec^-2), as archive.catalog.summaries uses it
    w_src = 2.0 / (s_cov[0] + s_cov[1])
    # how far each source can reach: its radius, or the ceiling where the chi^2 gate applies
    chi2_gate = max_chi2 is not None and scoring == "likelihood"
    ceil = np.where(chi2_gate & s_err, np.maximum(radius, float(max_radius_arcsec)), radius)

    rounds = _rounds(sources)
    n_rounds = int(rounds.max()) + 1 if ns else 0
    ctx = _Ctx(src_ra=src_ra, src_dec=src_dec, src_u=radec_to_vec(src_ra, src_dec), s_cov=s_cov,
               s_err=s_err, radius=radius, ceil=ceil, max_chi2=max_chi2,
               scoring=scoring, attach=same_visit == "attach",
               sources=sources, w_src=w_src, no=no,
               target=np.full(ns, -1, dtype=np.int64), dist=np.full(ns, np.nan),
               cost=np.full(ns, np.nan), founder=np.zeros(ns, dtype=bool),
               dup=np.zeros(ns, dtype=bool))

    if n_rounds == 1:
        # one visit: a single optimal assignment against the given objects
        s_o, o_o, sep = candidate_pairs(src_ra, src_dec, obj_ra, obj_dec, float(ceil.max()),
                                        obj_healpix29=obj_hp, src_healpix29=src_hp)
        o_cov, _ = _object_state(objects, o_o, default_var)
        ok, c = _score(ctx, s_o, radec_to_vec(obj_ra[o_o], obj_dec[o_o]), sep, o_cov)
        _resolve_round(ctx, np.arange(ns), s_o[ok], o_o[ok], sep[ok], c[ok])
    elif n_rounds > 1:
        _rounds_loop(ctx, src_hp, w_src, rounds, n_rounds, obj_ra, obj_dec, obj_hp, objects,
                     default_var)

    target, founder = ctx.target, ctx.founder
    ids_new = np.asarray(id_factory(int(founder.sum())), dtype=np.int64)
    founder_rows = np.flatnonzero(founder)
    # ids in founding (round) order
    founder_rows = founder_rows[np.lexsort((founder_rows, rounds[founder_rows]))]
    new_id_of_src = np.full(ns, -1, dtype=np.int64)
    new_id_of_src[founder_rows] = ids_new
    out_id = np.empty(ns, dtype=np.int64)
    existing = (target >= 0) & (target < no)
    out_id[existing] = obj_id[target[existing]]
    to_new = target >= no
    out_id[to_new] = new_id_of_src[target[to_new] - no]
    out_id[founder] = new_id_of_src[founder]
    obj_index = np.where(existing, target, -1)
    log.debug("associate: %d sources, %d objects, %d rounds: %d matched, %d new, %d duplicates (%s)",
              ns, no, n_rounds, ns - int(founder.sum()), int(founder.sum()), int(ctx.dup.sum()),
              scoring)
    return AssociationResult(dia_object_id=out_id, is_new=founder.copy(), distance_arcsec=ctx.dist,
                             object_index=obj_index, cost=ctx.cost, scoring=scoring,
                             duplicate=ctx.dup)
