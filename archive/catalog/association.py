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
2. **Scores.** Without positional errors (or ``use_errors=False``) the cost
   of a pair is its separation in arcsec.  With errors the cost is the
   negative log Gaussian likelihood of the tangent-plane offset under the
   combined covariance of source and object,
   ``0.5*chi2 + 0.5*ln det(S) + ln(2 pi)`` (S in arcsec^2); a row lacking
   errors then uses ``default_err_arcsec``.  ``ra_err`` is the uncertainty of
   the RA *coordinate* in degrees (as LSST's raErr), i.e. ``ra_err*cos(dec)``
   on the sky; ``ra_dec_cov`` (deg^2) is used where present.
3. **Assignment.** An object takes at most one source per visit.  Within a
   visit the assignment is globally optimal: the largest number of pairs is
   matched and, among those, the total cost is minimal (a min-weight full
   bipartite matching with "unmatched" dummies; see :func:`optimal_matching`).
   Components where one source and one object only see each other (the
   common case) are matched directly, vectorized; only the ambiguous edges
   go to the sparse solver (scipy LAPJVsp).
4. **Several visits in one batch** are associated as successive rounds in time
   order (by the smallest ``mjd`` of the visit when given, else by visit
   number).  A source left unmatched founds a new object positioned at that
   source; later rounds can match it.  Between rounds, every object that took
   a source moves to the weighted mean of its unit vectors and gets the
   isotropic error 1/sqrt(sum w), exactly as :mod:`archive.catalog.summaries`
   stores it (objects given with ``pos_sum_w`` keep their weight), so a batch
   of several visits associates like the same visits one at a time.
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
from archive.sky.healpix import radec_to_healpix29

log = logging.getLogger(__name__)

_ARCSEC_RAD = np.pi / (180.0 * 3600.0)
_LOG_2PI = float(np.log(2.0 * np.pi))


# --------------------------------------------------------------------------- geometry
def unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """3-D unit vectors (n, 3) of positions given in degrees."""
    ra = np.radians(np.asarray(ra, dtype=np.float64))
    dec = np.radians(np.asarray(dec, dtype=np.float64))
    cd = np.cos(dec)
    out = np.empty((ra.size, 3), dtype=np.float64)
    out[:, 0] = cd * np.cos(ra)
    out[:, 1] = cd * np.sin(ra)
    out[:, 2] = np.sin(dec)
    return out


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
    us = unit_vectors(src_ra, src_dec)[s_idx]
    d = us - unit_vectors(obj_ra[o_idx], obj_dec[o_idx])
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
    d = unit_vectors(src_ra, src_dec) - unit_vectors(obj_ra, obj_dec)
    a = np.radians(np.asarray(obj_ra, np.float64))
    b = np.radians(np.asarray(obj_dec, np.float64))
    sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
    dx = -sa * d[:, 0] + ca * d[:, 1]
    dy = -sb * ca * d[:, 0] - sb * sa * d[:, 1] + cb * d[:, 2]
    return dx / _ARCSEC_RAD, dy / _ARCSEC_RAD


# --------------------------------------------------------------------------- errors
def _cov_arrays(df: pd.DataFrame, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tangent-plane covariance (xx, yy, xy) per row in arcsec^2; NaN where unknown."""
    n = len(df)
    if "ra_err" not in df.columns or "dec_err" not in df.columns:
        return np.full(n, np.nan), np.full(n, np.nan), np.zeros(n)
    cosd = np.cos(np.radians(dec))
    ra_err = pd.to_numeric(df["ra_err"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    dec_err = pd.to_numeric(df["dec_err"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    sx = ra_err * cosd * 3600.0
    sy = dec_err * 3600.0
    if "ra_dec_cov" in df.columns:
        cov = pd.to_numeric(df["ra_dec_cov"], errors="coerce").to_numpy(np.float64,
                                                                         na_value=np.nan)
        cxy = np.where(np.isfinite(cov), cov * cosd * 3600.0 ** 2, 0.0)
    else:
        cxy = np.zeros(n)
    return sx * sx, sy * sy, cxy


def _fill_cov(xx: np.ndarray, yy: np.ndarray, xy: np.ndarray,
              default_var: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bad = ~(np.isfinite(xx) & np.isfinite(yy) & (xx > 0) & (yy > 0))
    return (np.where(bad, default_var, xx), np.where(bad, default_var, yy),
            np.where(bad | ~np.isfinite(xy), 0.0, xy))


def _pair_costs(scoring: str, sep: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                scov: tuple[np.ndarray, np.ndarray, np.ndarray],
                tcov: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Cost per pair: separation (arcsec), or -ln Gaussian likelihood of the offset."""
    if scoring == "distance":
        return sep.copy()
    xx, yy, xy = scov[0] + tcov[0], scov[1] + tcov[1], scov[2] + tcov[2]
    det = xx * yy - xy * xy
    bad = ~(det > 0)
    if bad.any():  # inconsistent covariances: drop the correlation
        xy = np.where(bad, 0.0, xy)
        det = xx * yy - xy * xy
    chi2 = (yy * dx * dx - 2.0 * xy * dx * dy + xx * dy * dy) / det
    return 0.5 * chi2 + 0.5 * np.log(det) + _LOG_2PI


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
@dataclass
class AssociationResult:
    """Outcome of :func:`associate`, aligned with the rows of ``sources``.

    Attributes
    ----------
    dia_object_id : int64, the object each source belongs to (existing or new).
    is_new : bool, True where the source founded a new object.
    distance_arcsec : float64, separation from the matched object (NaN if new).
    object_index : int64, positional row in ``objects`` of the matched object,
        -1 for new objects (founded by this source or by an earlier source of
        the batch).
    cost : float64, score of the chosen pair (NaN if new).
    scoring : ``"distance"`` or ``"likelihood"``.
    """

    dia_object_id: np.ndarray
    is_new: np.ndarray
    distance_arcsec: np.ndarray
    object_index: np.ndarray
    cost: np.ndarray
    scoring: str

    @property
    def n_new(self) -> int:
        return int(self.is_new.sum())

    @property
    def n_matched(self) -> int:
        return int(self.is_new.size - self.is_new.sum())

    def to_frame(self, index: pd.Index | None = None) -> pd.DataFrame:
        """The result as a DataFrame (one row per source)."""
        return pd.DataFrame({
            "dia_object_id": self.dia_object_id, "is_new": self.is_new,
            "distance_arcsec": self.distance_arcsec, "object_index": self.object_index,
            "cost": self.cost}, index=index)


def _column(df: pd.DataFrame, name: str, what: str, dtype=np.float64) -> np.ndarray:
    if name not in df.columns:
        raise ValidationError(f"{what}: missing column {name!r} (have {list(df.columns)})")
    try:
        return df[name].to_numpy(dtype)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what}: column {name!r} is not numeric/complete: {exc}") from None


def _rounds(sources: pd.DataFrame) -> np.ndarray:
    """Round number per source (0-based, time order of its visit)."""
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
        mjd = pd.to_numeric(sources["mjd"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        tmin = np.full(uniq.size, np.inf)
        np.minimum.at(tmin, inv, np.where(np.isfinite(mjd), mjd, np.inf))
        order = np.lexsort((np.arange(uniq.size), tmin))
    else:
        order = np.arange(uniq.size)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[order] = np.arange(uniq.size)
    return rank[inv.ravel()]


def _rounds_loop(src_ra, src_dec, src_u, src_hp, s_cov, w_src, rounds, n_rounds,
                 objects, obj_ra, obj_dec, obj_hp, o_cov, radius_arcsec, default_var,
                 scoring, target, dist, cost, founder) -> None:
    """Associate visit by visit, updating object positions between visits.

    Targets are the given objects (0..no-1) and every source as a potential
    founder of a new object (no + i).  After each visit, a target that took a
    source moves to the weighted mean of its unit vectors and gets the
    isotropic error 1/sqrt(sum w), exactly as the summaries would give; so a
    batch of several visits associates like the same visits one at a time.
    Candidates come from a pool with twice the radius; if a target drifts by
    more than one radius the pool is rebuilt from the current positions.
    """
    ns, no = src_ra.size, obj_ra.size
    pool_r = 2.0 * radius_arcsec
    margin = 2.0 * np.sin(0.5 * radius_arcsec * _ARCSEC_RAD)

    def build_pool(first_round: int, t_ra, t_dec, t_hp):
        rem = np.flatnonzero(rounds >= first_round)
        s, t, _ = candidate_pairs(src_ra[rem], src_dec[rem], t_ra, t_dec, pool_r,
                                  obj_healpix29=t_hp,
                                  src_healpix29=None if src_hp is None else src_hp[rem])
        return rem[s], t

    s1, t1 = build_pool(0, obj_ra, obj_dec, obj_hp)
    s2, t2 = build_pool(0, src_ra, src_dec, src_hp)
    ps = np.concatenate([s1, s2])
    pt = np.concatenate([t1, no + t2])
    # compact state over the targets that can ever be reached
    tid, pt_local = np.unique(pt, return_inverse=True)
    nt = tid.size
    is_obj = tid < no
    tu = np.empty((nt, 3))
    tu[is_obj] = unit_vectors(obj_ra[tid[is_obj]], obj_dec[tid[is_obj]])
    tu[~is_obj] = src_u[tid[~is_obj] - no]
    oc = _fill_cov(*(x[tid[is_obj]] for x in o_cov), default_var) if is_obj.any() else None
    txx, tyy, txy = np.empty(nt), np.empty(nt), np.zeros(nt)
    if oc is not None:
        txx[is_obj], tyy[is_obj], txy[is_obj] = oc
    sw = np.zeros(nt)
    if is_obj.any():
        rows = tid[is_obj]
        w0 = None
        if "pos_sum_w" in objects.columns:
            w0 = pd.to_numeric(objects["pos_sum_w"].iloc[rows], errors="coerce").to_numpy(
                np.float64, na_value=np.nan) / 3600.0 ** 2
        if w0 is None:
            w0 = np.full(rows.size, np.nan)
        fallback = 2.0 / (txx[is_obj] + tyy[is_obj])
        sw[is_obj] = np.where(np.isfinite(w0) & (w0 > 0), w0, fallback)
    swv = tu * sw[:, None]
    base = tu.copy()
    local_of = np.full(no + ns, -1, dtype=np.int64)
    local_of[tid] = np.arange(nt)

    order = np.argsort(rounds[ps], kind="stable")
    ps, pt_local = ps[order], pt_local[order]
    bounds = np.searchsorted(rounds[ps], np.arange(n_rounds + 1))
    src_by_round = np.argsort(rounds, kind="stable")
    br = np.searchsorted(rounds[src_by_round], np.arange(n_rounds + 1))
    chord_r2 = (2.0 * np.sin(0.5 * radius_arcsec * _ARCSEC_RAD)) ** 2
    for r in range(n_rounds):
        e = np.arange(bounds[r], bounds[r + 1])
        es, et = ps[e], pt_local[e]
        gt = tid[et]
        usable = (gt < no) | founder[np.maximum(gt - no, 0)]
        es, et = es[usable], et[usable]
        d = src_u[es] - tu[et]
        c2 = np.einsum("ij,ij->i", d, d)
        near = c2 <= chord_r2
        es, et, c2 = es[near], et[near], c2[near]
        sep = _chord_to_arcsec(np.sqrt(c2))
        if scoring == "likelihood":
            dx, dy = _offsets_vec(src_u[es], tu[et])
            c = _pair_costs(scoring, sep, dx, dy, tuple(x[es] for x in s_cov),
                            (txx[et], tyy[et], txy[et]))
        else:
            c = sep
        pick = optimal_matching(es, et, c)
        ms, mt = es[pick], et[pick]
        target[ms] = tid[mt]
        dist[ms] = sep[pick]
        cost[ms] = c[pick]
        members = src_by_round[br[r]:br[r + 1]]
        new = members[target[members] < 0]
        founder[new] = True
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
                t_ra = np.degrees(np.arctan2(tu[:, 1], tu[:, 0])) % 360.0
                t_dec = np.degrees(np.arctan2(tu[:, 2], np.hypot(tu[:, 0], tu[:, 1])))
                s3, t3 = build_pool(r + 1, t_ra, t_dec, None)
                keep = rounds[ps] <= r
                ps = np.concatenate([ps[keep], s3])
                pt_local = np.concatenate([pt_local[keep], t3])
                order = np.argsort(rounds[ps], kind="stable")
                ps, pt_local = ps[order], pt_local[order]
                bounds = np.searchsorted(rounds[ps], np.arange(n_rounds + 1))
                base = tu.copy()


def associate(sources: pd.DataFrame, objects: pd.DataFrame, radius_arcsec: float = 1.0,
              use_errors: bool = True, *, default_err_arcsec: float = 0.1,
              id_factory: Callable[[int], np.ndarray] = new_ids) -> AssociationResult:
    """Associate a batch of DIASources with known DIAObjects (pure, no I/O).

    Parameters
    ----------
    sources : DataFrame with ``ra``, ``dec`` (deg); optional ``ra_err``,
        ``dec_err`` (deg, RA-coordinate and Dec uncertainties), ``ra_dec_cov``
        (deg^2), ``visit`` (or ``exposure_id``) and ``mjd``.  Sources of one
        visit compete for objects; different visits are separate rounds in
        time order (without ``visit``/``exposure_id`` the batch is one visit).
        An optional ``healpix29`` column is used instead of recomputing it.
    objects : DataFrame with ``dia_object_id``, ``ra``, ``dec`` (deg); optional
        ``ra_err``, ``dec_err``, ``ra_dec_cov``, ``healpix29`` (fastest when
        sorted by it, as the store keeps them).  May be empty.
    radius_arcsec : match radius (arcsec); pairs farther apart never match.
    use_errors : score pairs by Gaussian likelihood when error columns exist;
        otherwise (or if False) by separation.
    default_err_arcsec : per-axis positional error (arcsec) assumed for rows
        without errors when scoring by likelihood.
    id_factory : ``n -> int64 ids`` for new objects (default :func:`new_ids`).

    Returns
    -------
    AssociationResult aligned with ``sources`` rows.
    """
    ns = len(sources)
    src_ra = _column(sources, "ra", "sources")
    src_dec = _column(sources, "dec", "sources")
    _check_positions(src_ra, src_dec, "sources")
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
    s_cov = _cov_arrays(sources, src_dec)
    o_cov = _cov_arrays(objects, obj_dec) if no else (np.empty(0), np.empty(0), np.empty(0))
    has_err = bool(np.isfinite(s_cov[0]).any() or np.isfinite(o_cov[0]).any())
    scoring = "likelihood" if (use_errors and has_err) else "distance"
    s_cov = _fill_cov(*s_cov, default_var)
    # position weight of a source (arcsec^-2), as archive.catalog.summaries uses it
    w_src = 2.0 / (s_cov[0] + s_cov[1])

    rounds = _rounds(sources)
    n_rounds = int(rounds.max()) + 1 if ns else 0
    src_u = unit_vectors(src_ra, src_dec)

    target = np.full(ns, -1, dtype=np.int64)  # object row, or no + founding source row
    dist = np.full(ns, np.nan)
    cost = np.full(ns, np.nan)
    founder = np.zeros(ns, dtype=bool)

    if n_rounds <= 1:
        # one visit: a single optimal assignment against the given objects
        s_o, o_o, sep = candidate_pairs(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec,
                                        obj_healpix29=obj_hp, src_healpix29=src_hp)
        if scoring == "likelihood":
            ou = unit_vectors(obj_ra[o_o], obj_dec[o_o])
            dx, dy = _offsets_vec(src_u[s_o], ou)
            oc = _fill_cov(o_cov[0][o_o], o_cov[1][o_o], o_cov[2][o_o], default_var)
            c = _pair_costs(scoring, sep, dx, dy, tuple(x[s_o] for x in s_cov), oc)
        else:
            c = sep
        pick = optimal_matching(s_o, o_o, c)
        target[s_o[pick]] = o_o[pick]
        dist[s_o[pick]] = sep[pick]
        cost[s_o[pick]] = c[pick]
        founder = target < 0
    else:
        _rounds_loop(src_ra, src_dec, src_u, src_hp, s_cov, w_src, rounds, n_rounds,
                     objects, obj_ra, obj_dec, obj_hp, o_cov, radius_arcsec, default_var,
                     scoring, target, dist, cost, founder)

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
    log.debug("associate: %d sources, %d objects, %d rounds: %d matched, %d new (%s)",
              ns, no, n_rounds, ns - int(founder.sum()), int(founder.sum()), scoring)
    return AssociationResult(dia_object_id=out_id, is_new=founder, distance_arcsec=dist,
                             object_index=obj_index, cost=cost, scoring=scoring)
