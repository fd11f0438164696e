"""Incremental association in the store: a batch of DIASources in, DIAObject versions out.

For one batch (one visit, or several, or part of a visit), inside one store
transaction:

1. validate the rows against ``dia_source``;
2. refuse exposures already stored (or, with ``replace=True``, undo their old
   contribution first: remove their sums from the objects, recompute the
   extremes of the objects that need it, delete the old rows);
3. load the *current* DIAObjects of the batch's footprint plus a margin (the
   HEALPix pixels holding the sources and their neighbours at a coarse order
   whose pixels are wider than the match radius), so matches across partition
   borders, RA 0/360 and the poles are found -- only the columns association
   needs (:data:`ASSOCIATION_COLUMNS`; on Postgres an index-only scan of the
   partial covering index of current versions);
4. **late data** (see below): if objects near the batch already hold
   detections as late as the batch's earliest visit, their later DIASources
   are taken back and re-associated with the batch, in time order;
5. associate (:func:`archive.catalog.association.associate`), read all
   columns of only the matched objects, update their running sums
   (:mod:`archive.catalog.summaries`);
6. close the touched objects' current versions (``validity_end = now``) and
   append the new versions (``validity_start = now``) and the DIASources.

Arrival order
-------------
The objects must not depend on the order visits arrive in (reprocessing, late
detectors, alert packets carrying earlier detections): a batch must end in
the objects a time-ordered ingest gives.  The footprint's current objects come
with ``last_mjd``; when none is as late as the batch's earliest ``mjd`` (minus
:data:`VISIT_SPAN_DAYS`) the batch is in time order and nothing more is read
-- the common case costs nothing extra.  Otherwise the *affected* objects
are those within twice the reach of the gate of a source to associate (or of
another affected object) whose ``last_mjd`` is that late; their DIASources
from the batch's earliest ``mjd`` on (and every stored source of the batch's
visits, so a visit arriving in several batches is one round) are
re-associated with the batch, which repeats until no further object is
affected.  Their contributions are removed from the objects (the objects are
then as they were before that time), the rows are associated again with the
batch in time order (:func:`associate` runs the visits as rounds, positions
moving between visits as the stored summaries would), and every affected
object gets a new version (history kept: the old versions are closed, not
rewritten).  An object left without sources is closed without a new version,
unless a new object took over its sources: the new object then keeps the old
id (the one that gave it most of its sources).  The cost is proportional to
the affected objects' later history, not to the archive's.

:func:`reassociate` rebuilds a region from its DIASources in time order (every
object holding a source in the region, whole); objects outside it are
neighbours that keep their sources.

Assumptions: one configuration (radius, gate) per archive, and all rows of a
visit share its ``mjd`` to within :data:`VISIT_SPAN_DAYS`.

The cost is proportional to the batch and its footprint, not to the history.
On Postgres, transaction-level advisory locks on the coarse pixels of the
footprint (taken in sorted order; a footprint that grows while the affected
objects are found takes the new pixels then) serialize batches whose
footprints overlap, so two processes never found the same object twice; the
Parquet store has a single writer lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from archive.catalog.alerts import SURVEY_RADIUS_ARCSEC, survey_radius_arcsec
from archive.catalog.association import (DEFAULT_MAX_CHI2, DEFAULT_MAX_RADIUS_ARCSEC,
                                         DEFAULT_RADIUS_ARCSEC, DUPLICATE_FLAG, AssociationResult,
                                         associate, candidate_pairs)
from archive.catalog.store import CatalogStore, frame_from_arrow
from archive.catalog.summaries import (apply_forced, apply_sources, empty_objects, finalize,
                                       recompute_extrema)
from archive.catalog.validate import conform
from archive.errors import ArchiveError, ValidationError
from archive.sky.healpix import partition_pixel
from archive.sky.regions import PixelSet

log = logging.getLogger(__name__)

#: Advisory-lock namespace for association (first key of pg_advisory_xact_lock).
LOCK_KEY = 0x0A55
#: Order of the advisory-lock pixels (~0.9 deg).
LOCK_ORDER = 6

#: Columns of the footprint's current DIAObjects that association reads: positions
#: and errors (candidates and scores), ``pos_sum_w`` (the objects' weights and errors),
#: ``n_dia_sources`` (objects emptied by a replace are skipped), ``validity_start``
#: (ingest-time check), ``healpix29`` (grid join), ``last_mjd`` (is the batch late?).
#: Postgres holds exactly these in the partial index ``ix_dia_object_current``.
ASSOCIATION_COLUMNS = ["dia_object_id", "validity_start", "ra", "dec", "ra_err", "dec_err", "ra_dec_cov",
                       "healpix29", "pos_sum_w", "n_dia_sources", "last_mjd"]

#: Rows of one visit (its detectors) may differ this much in ``mjd`` (days): objects whose
#: last detection is this close before a batch's earliest are checked for its visits.
VISIT_SPAN_DAYS = 1.0 / 1440.0


@dataclass
class AssociationConfig:
    """How DIASources are associated (see :func:`archive.catalog.association.associate`).

    radius_arcsec : match radius (arcsec; the gate's floor) for every row, or
        ``None`` (default): 1" (:data:`~archive.catalog.association.DEFAULT_RADIUS_ARCSEC`),
        and a survey's own radius for its rows
        (:data:`archive.catalog.alerts.SURVEY_RADIUS_ARCSEC`: ZTF 1.5").
    max_radius_arcsec : the gate's ceiling (arcsec): how far a source with
        measured errors may reach when the offset's chi^2 allows.
    max_chi2 : that chi^2 limit (2 dof); ``None``: the radius alone.
    use_errors : score by Gaussian likelihood where positional errors exist.
    footprint_order : HEALPix order of the footprint pixels whose current
        objects are loaded; its pixels (plus neighbours) must be wider than the
        reach.  ``None`` chooses the finest order up to 10 that is.
    """

    radius_arcsec: float | None = None
    max_radius_arcsec: float = DEFAULT_MAX_RADIUS_ARCSEC
    max_chi2: float | None = DEFAULT_MAX_CHI2
    use_errors: bool = True
    footprint_order: int | None = None

    def __post_init__(self) -> None:
        if self.radius_arcsec is not None and not (np.isfinite(self.radius_arcsec)
                                                   and self.radius_arcsec > 0):
            raise ValidationError(f"radius_arcsec must be a positive number of arcsec, got "
                                  f"{self.radius_arcsec}")
        if not (np.isfinite(self.max_radius_arcsec) and self.max_radius_arcsec > 0):
            raise ValidationError(f"max_radius_arcsec must be a positive number of arcsec, got "
                                  f"{self.max_radius_arcsec}")

    def radii(self, sources: pd.DataFrame) -> np.ndarray:
        """Match radius (arcsec) of every row."""
        if self.radius_arcsec is not None:
            return np.full(len(sources), float(self.radius_arcsec))
        return survey_radius_arcsec(sources, DEFAULT_RADIUS_ARCSEC)

    def reach(self) -> float:
        """The farthest (arcsec) any source may match."""
        if self.radius_arcsec is None:
            r = max([DEFAULT_RADIUS_ARCSEC, *SURVEY_RADIUS_ARCSEC.values()])
        else:
            r = float(self.radius_arcsec)
        if self.max_chi2 is not None and self.use_errors:
            r = max(r, float(self.max_radius_arcsec))
        return r

    def order(self) -> int:
        if self.footprint_order is not None:
            return int(self.footprint_order)
        # order-k pixels are ~ 58.6 deg / 2**k across; keep them > 4 reaches
        k = int(np.floor(np.log2(58.6 * 3600.0 / (4.0 * max(self.reach(), 1e-3)))))
        return int(min(max(k, 0), 10))

    def associate(self, sources: pd.DataFrame, objects: pd.DataFrame) -> AssociationResult:
        """:func:`associate` with this configuration."""
        return associate(sources, objects, radius_arcsec=self.radii(sources),
                         use_errors=self.use_errors, max_radius_arcsec=self.max_radius_arcsec,
                         max_chi2=self.max_chi2)


@dataclass
class IngestReport:
    """What one association batch did.

    n_reassociated: stored DIASources taken back and associated again because the
    batch was late (or by :func:`reassociate`); n_duplicates: sources attached as
    duplicates of their object's visit; n_closed_objects: objects left without
    sources (closed, no new version).
    """

    n_sources: int
    n_new_objects: int
    n_updated_objects: int
    exposure_ids: list[int]
    validity_start: float
    n_replaced_sources: int = 0
    dia_object_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)
    n_reassociated: int = 0
    n_duplicates: int = 0
    n_closed_objects: int = 0


def now_mjd_tai() -> float:
    """The current time as MJD (TAI)."""
    from astropy.time import Time

    return float(Time.now().tai.mjd)


def _lock(tx, region: PixelSet) -> None:
    """Advisory locks (Postgres) on the order-LOCK_ORDER pixels covering ``region``,
    whatever its order (a wide match radius gives a coarser footprint)."""
    if hasattr(tx, "lock_partitions"):
        tx.lock_partitions(LOCK_KEY, region.pixels_at(LOCK_ORDER))


def _store_partitions(store: CatalogStore, region: PixelSet) -> np.ndarray | None:
    """Partition pixels of the Parquet store covering the region (a read hint)."""
    order = getattr(store, "order", None)
    if order is None:
        return None
    lo = region.pixel_ranges()
    return np.unique(np.concatenate([partition_pixel(np.array([a, b - 1]), order) for a, b in lo]
                                    + [np.empty(0, np.int64)]))


def ingest_dia_sources(store: CatalogStore, data, config: AssociationConfig | None = None, *,
                       replace: bool = False, ingest_mjd: float | None = None,
                       where: str | None = None, skip_known_external: bool = False) -> IngestReport:
    """Associate a batch of DIASources with the stored DIAObjects and write everything atomically.

    ``data``: dia_source rows (DataFrame/Arrow); a ``dia_object_id`` column is
    ignored (association decides it).  ``replace``: re-ingest exposures already
    stored, undoing their old contribution first.  ``skip_known_external``
    (alert streams, whose packets repeat earlier detections and share
    exposures): drop rows whose ``external_id`` is already stored instead of
    refusing their exposures.  ``ingest_mjd`` (MJD TAI)
    stamps the new object versions (default: now); it must be later than the
    versions it replaces.  A batch older than detections already stored near
    it re-associates the affected objects in time order (module docstring).
    """
    config = config or AssociationConfig()
    t_src = store.table("dia_source")
    if isinstance(data, pd.DataFrame) and "dia_object_id" in data.columns:
        data = data.drop(columns=["dia_object_id"])
    sources = frame_from_arrow(conform(t_src, data, where))
    if sources.empty:
        raise ValidationError(f"{where or 'dia_source batch'}: no rows")
    exposures = np.unique(sources["exposure_id"].to_numpy(np.int64))

    with store.transaction() as tx:
        if skip_known_external:
            ext = sources["external_id"].dropna().astype(str).unique()
            known = tx.select_in("dia_source", "external_id", ext) if len(ext) else sources.iloc[:0]
            sources = sources[~sources["external_id"].isin(set(known["external_id"]))].reset_index(drop=True)
            if sources.empty:
                return IngestReport(0, 0, 0, [], now_mjd_tai() if ingest_mjd is None else float(ingest_mjd))
            old = sources.iloc[:0]
        else:
            old = tx.select_in("dia_source", "exposure_id", exposures)
        if len(old) and not replace:
            seen = sorted(set(old["exposure_id"].astype("int64").tolist()))
            raise ArchiveError(f"exposure(s) {seen[:10]} already ingested ({len(old)} dia_source rows); "
                               "use --replace (replace=True) to re-ingest them")
        ra = np.concatenate([sources["ra"].to_numpy(float), old["ra"].to_numpy(float)])
        dec = np.concatenate([sources["dec"].to_numpy(float), old["dec"].to_numpy(float)])
        region = PixelSet.around(ra, dec, config.order())
        _lock(tx, region)
        # the clock is read once the footprint is locked: a batch that waited for an overlapping
        # one gets a later time than the versions that one wrote
        now = now_mjd_tai() if ingest_mjd is None else float(ingest_mjd)
        run = _Run(tx, store, config, now, where)
        if len(old):
            run.remove(old)
        current, late, region, rows_affected = run.late_rows(sources, region)
        if len(late):
            run.remove(late, rest=rows_affected)
            current = run.override(current)
            log.info("late batch: %d stored DIASources of %d objects re-associated in time order",
                     len(late), late["dia_object_id"].nunique())
        report = run.associate_and_write(sources, late, current, region)
    report.exposure_ids = exposures.tolist()
    report.n_replaced_sources = len(old)
    log.info("associated %d DIASources: %d new objects, %d updated, %d re-associated, %d duplicates",
             report.n_sources, report.n_new_objects, report.n_updated_objects,
             report.n_reassociated, report.n_duplicates)
    return report


def reassociate(store: CatalogStore, region=None, config: AssociationConfig | None = None, *,
                ingest_mjd: float | None = None) -> IngestReport:
    """Rebuild the DIAObjects of a region from its DIASources, in time order.

    Every object holding a DIASource inside ``region`` (an
    :mod:`archive.sky.regions` region; ``None``: the whole archive) is taken
    apart -- all its sources, also those outside the region -- and its sources
    are associated again visit by visit in time order, with the objects around
    the region as neighbours that keep theirs.  Objects keep their ids where a
    rebuilt object took most of an old one's sources; the others are closed
    (history kept: every changed object gets a new version, stamped
    ``ingest_mjd``, default now).  Sources stored without an object are
    associated too.  Returns an :class:`IngestReport` (``n_reassociated``: the
    sources associated again).
    """
    config = config or AssociationConfig()
    with store.transaction() as tx:
        if region is None:
            inside = _all_rows(tx, store, ["dia_source_id", "dia_object_id", "ra", "dec"])
        else:
            inside = tx.query_region("dia_source", region,
                                     columns=["dia_source_id", "dia_object_id", "ra", "dec"])
        now = now_mjd_tai() if ingest_mjd is None else float(ingest_mjd)
        if inside.empty:
            return IngestReport(0, 0, 0, [], now)
        # lock the region's footprint before reading its objects whole, then what they reach
        _lock(tx, PixelSet.around(inside["ra"].to_numpy(float), inside["dec"].to_numpy(float),
                                  config.order()))
        ids = np.unique(inside["dia_object_id"].dropna().to_numpy(np.int64))
        rows = tx.select_in("dia_source", "dia_object_id", ids) if ids.size else None
        loose = inside["dia_object_id"].isna().to_numpy()
        if loose.any():
            more = tx.select_in("dia_source", "dia_source_id",
                                inside["dia_source_id"].to_numpy(np.int64)[loose])
            rows = more if rows is None else pd.concat([rows, more], ignore_index=True)
        fp = PixelSet.around(rows["ra"].to_numpy(float), rows["dec"].to_numpy(float), config.order())
        _lock(tx, fp)
        if ingest_mjd is None:
            now = now_mjd_tai()
        run = _Run(tx, store, config, now, "reassociate")
        run.remove(rows, rest=rows)
        current = run.current(fp)
        report = run.associate_and_write(rows.iloc[:0], rows, current, fp)
    report.exposure_ids = np.unique(rows["exposure_id"].to_numpy(np.int64)).tolist()
    log.info("re-associated %d DIASources of %d objects: %d objects now (%d new), %d closed",
             report.n_reassociated, ids.size, np.unique(report.dia_object_ids).size,
             report.n_new_objects, report.n_closed_objects)
    return report


def _all_rows(tx, store: CatalogStore, columns: list[str]) -> pd.DataFrame:
    """Every dia_source row (the columns given): the whole sky as one region."""
    from archive.sky.regions import Cone

    return tx.query_region("dia_source", Cone(0.0, 90.0, 180.0), columns=columns)


class _Run:
    """One association transaction: objects changed in memory, rows taken out, the write."""

    def __init__(self, tx, store: CatalogStore, config: AssociationConfig, now: float,
                 where: str | None) -> None:
        self.tx, self.store, self.config, self.now, self.where = tx, store, config, now, where
        #: full current dia_object rows whose sums changed in this transaction (not finalized)
        self.work: pd.DataFrame | None = None
        #: dia_source ids deleted in this transaction (to be written again or replaced)
        self.removed = np.empty(0, np.int64)

    # -- objects ---------------------------------------------------------------
    def _objects(self, ids: np.ndarray, parts: np.ndarray | None) -> pd.DataFrame:
        """Current full versions of ``ids``: from :attr:`work` where changed, else stored."""
        have = np.empty(0, np.int64) if self.work is None else self.work["dia_object_id"].to_numpy(np.int64)
        mine = np.isin(ids, have)
        out = [] if self.work is None else [self.work[np.isin(have, ids)]]
        need = ids[~mine]
        if need.size:
            got = self.tx.current_versions("dia_object", need, partitions=parts)
            missing = np.setdiff1d(need, got["dia_object_id"].to_numpy(np.int64))
            if missing.size and parts is not None:
                got = pd.concat([got, self.tx.current_versions("dia_object", missing)], ignore_index=True)
                missing = np.setdiff1d(need, got["dia_object_id"].to_numpy(np.int64))
            if missing.size:
                raise ArchiveError(f"{missing.size} DIAObject(s) have no current version (e.g. "
                                   f"{missing[:3].tolist()}); changed by another writer during the ingest?")
            _check_later(self.now, got["validity_start"].to_numpy(np.float64))
            out.append(got)
        return pd.concat(out, ignore_index=True) if len(out) > 1 else (
            out[0].reset_index(drop=True) if out else empty_objects(0))

    def _put(self, objects: pd.DataFrame) -> None:
        if self.work is None:
            self.work = objects.reset_index(drop=True)
            return
        ids = objects["dia_object_id"].to_numpy(np.int64)
        keep = ~np.isin(self.work["dia_object_id"].to_numpy(np.int64), ids)
        self.work = pd.concat([self.work[keep], objects], ignore_index=True)

    def remove(self, rows: pd.DataFrame, rest: pd.DataFrame | None = None) -> None:
        """Take stored DIASources out: their contributions leave their objects (in
        :attr:`work`; extremes recomputed from the remaining rows, ``rest`` when it
        holds all rows of those objects, else read), and the rows are deleted."""
        rows = rows.reset_index(drop=True)
        gone = np.union1d(self.removed, rows["dia_source_id"].to_numpy(np.int64))
        owned = rows[rows["dia_object_id"].notna()]
        if len(owned):
            ids = np.unique(owned["dia_object_id"].to_numpy(np.int64))
            parts = _store_partitions(self.store, PixelSet.around(
                owned["ra"].to_numpy(float), owned["dec"].to_numpy(float), self.config.order()))
            upd = apply_sources(self._objects(ids, parts), owned, -1, validity_start=self.now)
            objects = upd.objects
            if upd.stale.size:
                if rest is None:
                    rest = self.tx.select_in("dia_source", "dia_object_id", upd.stale)
                rest = rest[~np.isin(rest["dia_source_id"].to_numpy(np.int64), gone)]
                forced = self.tx.select_in("dia_forced_source", "dia_object_id", upd.stale)
                objects = recompute_extrema(objects, rest, forced if len(forced) else None,
                                            ids=upd.stale)
            self._put(objects)
        self.tx.delete("dia_source", "dia_source_id", rows["dia_source_id"].to_numpy(np.int64))
        self.removed = gone

    def override(self, current: pd.DataFrame) -> pd.DataFrame:
        """The footprint's association columns with the changed objects' values in place
        (same rows, same order), and changed objects outside the footprint appended."""
        if self.work is None or self.work.empty:
            return current
        done = finalize(self.work)
        ids_c = current["dia_object_id"].to_numpy(np.int64)
        ids_u = done["dia_object_id"].to_numpy(np.int64)
        pos = pd.Index(ids_u).get_indexer(ids_c)
        hit = pos >= 0
        out = current.copy()
        if hit.any():
            for c in ASSOCIATION_COLUMNS:
                col = out[c].to_numpy(copy=True)
                col[hit] = done[c].to_numpy(dtype=col.dtype)[pos[hit]]
                out[c] = col
        outside = ~np.isin(ids_u, ids_c)
        if outside.any():
            out = pd.concat([out, done.loc[outside, ASSOCIATION_COLUMNS]], ignore_index=True)
        return out

    def current(self, region: PixelSet) -> pd.DataFrame:
        """Association columns of the region's current objects, changed ones in place."""
        cur = self.tx.query_region("dia_object", region, columns=ASSOCIATION_COLUMNS, current_only=True)
        _check_later(self.now, cur["validity_start"].to_numpy(np.float64))
        return self.override(cur)

    # -- late data ---------------------------------------------------------------
    def late_rows(self, sources: pd.DataFrame, region: PixelSet
                  ) -> tuple[pd.DataFrame, pd.DataFrame, PixelSet, pd.DataFrame]:
        """Stored DIASources to associate again with ``sources`` so that the result is
        that of a time-ordered ingest (module docstring).

        Returns ``(current objects of the final region, late rows, region, every row of
        the affected objects)``; the region grows (and is locked) as affected objects
        are found.
        """
        t0 = float(sources["mjd"].min())
        visits = np.unique(sources["visit"].to_numpy(np.int64))
        link = 2.0 * self.config.reach()
        affected = np.empty(0, np.int64)
        late = sources.iloc[:0]
        rows_all = [sources.iloc[:0]]
        while True:
            current = self.current(region)
            live = current[current["n_dia_sources"].to_numpy() > 0]
            lm = live["last_mjd"].to_numpy(np.float64)
            maybe = (lm >= t0 - VISIT_SPAN_DAYS) & ~np.isin(live["dia_object_id"].to_numpy(np.int64), affected)
            if not maybe.any():  # the common case: the batch is later than all it can touch
                break
            near_ids = live["dia_object_id"].to_numpy(np.int64)
            aff = np.isin(near_ids, affected)
            pra = np.concatenate([sources["ra"].to_numpy(float), late["ra"].to_numpy(float),
                                  live["ra"].to_numpy(float)[aff]])
            pdec = np.concatenate([sources["dec"].to_numpy(float), late["dec"].to_numpy(float),
                                   live["dec"].to_numpy(float)[aff]])
            cand = live[maybe]
            _, o, _ = candidate_pairs(pra, pdec, cand["ra"].to_numpy(float), cand["dec"].to_numpy(float),
                                      link, obj_healpix29=cand["healpix29"].to_numpy(np.int64))
            new = np.unique(cand["dia_object_id"].to_numpy(np.int64)[o])
            if new.size == 0:
                break
            affected = np.union1d(affected, new)
            rows = self.tx.select_in("dia_source", "dia_object_id", new)
            rows = rows[~np.isin(rows["dia_source_id"].to_numpy(np.int64), self.removed)]
            rows_all.append(rows)
            is_late = ((rows["mjd"].to_numpy(np.float64) >= t0)
                       | np.isin(rows["visit"].to_numpy(np.int64), visits))
            late = pd.concat([late, rows[is_late]], ignore_index=True)
            grown = PixelSet.around(np.concatenate([sources["ra"].to_numpy(float), late["ra"].to_numpy(float)]),
                                    np.concatenate([sources["dec"].to_numpy(float), late["dec"].to_numpy(float)]),
                                    region.order)
            extra = np.setdiff1d(grown.pixels, region.pixels)
            if extra.size:
                _lock(self.tx, PixelSet(region.order, extra))
                region = PixelSet(region.order, np.union1d(region.pixels, extra))
        return current, late, region, pd.concat(rows_all, ignore_index=True)

    # -- association and the write ------------------------------------------------
    def associate_and_write(self, sources: pd.DataFrame, late: pd.DataFrame,
                            current: pd.DataFrame, region: PixelSet) -> IngestReport:
        """Associate new ``sources`` and taken-back ``late`` rows against ``current``
        and write sources, closed and new object versions."""
        tx, now = self.tx, self.now
        t_src = self.store.table("dia_source")
        batch = pd.concat([sources, late], ignore_index=True) if len(late) else sources.reset_index(drop=True)
        prev = np.concatenate([np.full(len(sources), -1, np.int64),
                               late["dia_object_id"].fillna(-1).to_numpy(np.int64)])
        live = current[current["n_dia_sources"].to_numpy() > 0].reset_index(drop=True)
        res = self.config.associate(batch, live)
        work_ids = (np.empty(0, np.int64) if self.work is None
                    else self.work["dia_object_id"].to_numpy(np.int64))
        emptied = (np.empty(0, np.int64) if self.work is None else
                   work_ids[self.work["n_dia_sources"].to_numpy() == 0])
        ids = _reuse_ids(res.dia_object_id, res.is_new, prev, emptied)
        batch["dia_object_id"] = ids
        flags = batch["flags"].to_numpy(np.int64)
        batch["flags"] = np.where(res.duplicate, flags | DUPLICATE_FLAG, flags & ~DUPLICATE_FLAG)
        # all columns only of the stored objects that took a source (their summaries change)
        hit = res.object_index >= 0
        rows = np.unique(res.object_index[hit])
        matched = live["dia_object_id"].to_numpy(np.int64)[rows]
        fetch = ~np.isin(matched, work_ids)
        parts = _store_partitions(self.store, region)
        full = tx.current_versions("dia_object", matched[fetch],
                                   healpix29=live["healpix29"].to_numpy(np.int64)[rows[fetch]],
                                   partitions=parts)
        if len(full) != int(fetch.sum()):
            raise ArchiveError(f"{int(fetch.sum()) - len(full)} matched DIAObject(s) have no current version "
                               "any more (changed by another writer during the ingest?)")
        objects_in = full if self.work is None else pd.concat([self.work, full], ignore_index=True)
        objects = apply_sources(objects_in, batch, +1, validity_start=now).objects
        existing_ids = np.union1d(current["dia_object_id"].to_numpy(np.int64), work_ids)
        touched = np.union1d(np.unique(ids), work_ids)
        to_close = np.intersect1d(touched, existing_ids)
        oid = objects["dia_object_id"].to_numpy(np.int64)
        empty_now = objects["n_dia_sources"].to_numpy() == 0
        new_versions = finalize(objects[np.isin(oid, touched) & ~empty_now])
        tx.close_versions("dia_object", to_close, now, parts)
        if len(new_versions):
            tx.append("dia_object", conform(self.store.table("dia_object"), new_versions, "dia_object versions"),
                      check_keys=False)
        tx.append("dia_source", conform(t_src, batch, self.where))
        uid = np.unique(ids)
        closed = np.intersect1d(oid[empty_now], to_close)
        return IngestReport(
            n_sources=len(sources), n_new_objects=int(np.setdiff1d(uid, existing_ids).size),
            n_updated_objects=int(np.setdiff1d(to_close, closed).size),
            exposure_ids=[], validity_start=now,
            dia_object_ids=ids[:len(sources)] if len(sources) else ids,
            n_reassociated=len(late), n_duplicates=int(res.duplicate.sum()),
            n_closed_objects=int(closed.size))


def _reuse_ids(ids: np.ndarray, is_new: np.ndarray, prev: np.ndarray,
               emptied: np.ndarray) -> np.ndarray:
    """Give a new object the id of an object emptied by re-association whose sources it took.

    ``ids``: object per row after association; ``is_new``: rows that founded an object;
    ``prev``: the row's object before (-1 for new rows); ``emptied``: ids of objects left
    without sources.  Pairs (new object, emptied object) are ranked by the number of rows
    they share and taken one-to-one, best first (ties by ids).
    """
    new_ids_ = np.unique(ids[is_new])
    sel = np.isin(ids, new_ids_) & np.isin(prev, emptied)
    if not sel.any():
        return ids
    pairs = pd.DataFrame({"new": ids[sel], "old": prev[sel]}).value_counts().reset_index(name="n")
    pairs = pairs.sort_values(["n", "new", "old"], ascending=[False, True, True], kind="stable")
    mapping: dict[str, np.ndarray] = {"new": np.empty(0, np.int64), "old": np.empty(0, np.int64)}
    while len(pairs):
        # a pair is taken when it is the best of both its new and its old object
        best_new = ~pairs["new"].duplicated()
        best_old = ~pairs["old"].duplicated()
        take = pairs[(best_new & best_old).to_numpy()]
        mapping["new"] = np.concatenate([mapping["new"], take["new"].to_numpy(np.int64)])
        mapping["old"] = np.concatenate([mapping["old"], take["old"].to_numpy(np.int64)])
        pairs = pairs[~pairs["new"].isin(take["new"]) & ~pairs["old"].isin(take["old"])]
    out = ids.copy()
    pos = pd.Index(mapping["new"]).get_indexer(ids)
    out[pos >= 0] = mapping["old"][pos[pos >= 0]]
    return out


def _check_later(now: float, validity_start) -> None:
    """A new version must start after the versions it closes (else their interval would be empty)."""
    vs = np.asarray(validity_start, dtype=np.float64)
    if vs.size and (vs >= now).any():
        raise ArchiveError(f"ingest time {now} is not later than stored object versions "
                           f"(latest {vs.max()}); clocks disagree?")


def ingest_forced_sources(store: CatalogStore, data, *, ingest_mjd: float | None = None,
                          where: str | None = None) -> int:
    """Write dia_forced_source rows and fold them into their objects' forced-flux summaries."""
    t = store.table("dia_forced_source")
    forced = frame_from_arrow(conform(t, data, where))
    if forced.empty:
        return 0
    ids = np.unique(forced["dia_object_id"].to_numpy(np.int64))
    with store.transaction() as tx:
        region = PixelSet.around(forced["ra"].to_numpy(float), forced["dec"].to_numpy(float),
                                 AssociationConfig().order())
        _lock(tx, region)
        now = now_mjd_tai() if ingest_mjd is None else float(ingest_mjd)  # after the lock, as above
        objects = tx.current_versions("dia_object", ids)
        _check_later(now, objects["validity_start"].to_numpy(np.float64) if "validity_start" in objects else [])
        unknown = np.setdiff1d(ids, objects["dia_object_id"].to_numpy(np.int64))
        if unknown.size:
            raise ValidationError(f"{where or 'dia_forced_source'}: unknown dia_object_id(s) "
                                  f"{unknown[:5].tolist()}")
        # psf_flux/psf_flux_err of a forced row (difference image) feed the forced-flux sums
        upd = apply_forced(objects, forced, +1, validity_start=now)
        tx.close_versions("dia_object", ids, now)
        tx.append("dia_object", conform(store.table("dia_object"), finalize(upd.objects)), check_keys=False)
        tx.append("dia_forced_source", pa.Table.from_pandas(forced, schema=t.arrow_schema, preserve_index=False))
    return len(forced)
