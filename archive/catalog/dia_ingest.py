"""Incremental association in the store: a batch of DIASources in, DIAObject versions out.

For one batch (one visit, or several), inside one store transaction:

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
4. associate (:func:`archive.catalog.association.associate`), read all
   columns of only the matched objects, update their running sums
   (:mod:`archive.catalog.summaries`);
5. close the touched objects' current versions (``validity_end = now``) and
   append the new versions (``validity_start = now``) and the DIASources.

The cost is proportional to the batch and its footprint, not to the history.
On Postgres, transaction-level advisory locks on the coarse pixels of the
footprint (taken in sorted order) serialize batches whose footprints overlap,
so two processes never found the same object twice; the Parquet store has a
single writer lock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from archive.catalog.association import associate
from archive.catalog.store import CatalogStore, frame_from_arrow
from archive.catalog.summaries import apply_forced, apply_sources, finalize, recompute_extrema
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
#: and errors (candidates and scores), ``pos_sum_w`` (weights when a batch holds
#: several visits), ``n_dia_sources`` (objects emptied by a replace are skipped),
#: ``validity_start`` (ingest-time check), ``healpix29`` (grid join).  Postgres
#: holds exactly these in the partial index ``ix_dia_object_current``.
ASSOCIATION_COLUMNS = ["dia_object_id", "validity_start", "ra", "dec", "ra_err", "dec_err", "ra_dec_cov",
                       "healpix29", "pos_sum_w", "n_dia_sources"]


@dataclass
class AssociationConfig:
    """How DIASources are associated.

    radius_arcsec : match radius (arcsec).
    use_errors : score by Gaussian likelihood where positional errors exist.
    footprint_order : HEALPix order of the footprint pixels whose current
        objects are loaded; its pixels (plus neighbours) must be wider than the
        radius.  ``None`` chooses the finest order up to 10 that is.
    """

    radius_arcsec: float = 1.0
    use_errors: bool = True
    footprint_order: int | None = None

    def order(self) -> int:
        if self.footprint_order is not None:
            return int(self.footprint_order)
        # order-k pixels are ~ 58.6 deg / 2**k across; keep them > 4 radii
        k = int(np.floor(np.log2(58.6 * 3600.0 / (4.0 * max(self.radius_arcsec, 1e-3)))))
        return int(min(max(k, 0), 10))


@dataclass
class IngestReport:
    """What one association batch did."""

    n_sources: int
    n_new_objects: int
    n_updated_objects: int
    exposure_ids: list[int]
    validity_start: float
    n_replaced_sources: int = 0
    dia_object_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)


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
    versions it replaces.
    """
    config = config or AssociationConfig()
    t_src = store.table("dia_source")
    if isinstance(data, pd.DataFrame) and "dia_object_id" in data.columns:
        data = data.drop(columns=["dia_object_id"])
    sources = frame_from_arrow(conform(t_src, data, where))
    if sources.empty:
        raise ValidationError(f"{where or 'dia_source batch'}: no rows")
    exposures = np.unique(sources["exposure_id"].to_numpy(np.int64))
    t_obj = store.table("dia_object")

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
        parts = _store_partitions(store, region)
        current = tx.query_region("dia_object", region, columns=ASSOCIATION_COLUMNS, current_only=True)
        _check_later(now, current["validity_start"].to_numpy(np.float64))
        touched_old = np.empty(0, np.int64)
        undone = None
        if len(old):
            undone, touched_old = _undo(tx, old, exposures, now, parts)
            current = _with_undone(current, undone)
        live = current[current["n_dia_sources"] > 0].reset_index(drop=True)
        res = associate(sources, live, radius_arcsec=config.radius_arcsec, use_errors=config.use_errors)
        sources["dia_object_id"] = res.dia_object_id
        # all columns only of the stored objects that took a source (their summaries change)
        hit = res.object_index >= 0
        matched_rows = np.unique(res.object_index[hit])
        matched = live["dia_object_id"].to_numpy(np.int64)[matched_rows]
        have = np.empty(0, np.int64) if undone is None else undone["dia_object_id"].to_numpy(np.int64)
        fetch = ~np.isin(matched, have)
        full = tx.current_versions("dia_object", matched[fetch],
                                   healpix29=live["healpix29"].to_numpy(np.int64)[matched_rows[fetch]],
                                   partitions=parts)
        if len(full) != int(fetch.sum()):
            raise ArchiveError(f"{int(fetch.sum()) - len(full)} matched DIAObject(s) have no current version "
                               "any more (changed by another writer during the ingest?)")
        objects_in = full if undone is None else pd.concat([undone, full], ignore_index=True)
        upd = apply_sources(objects_in, sources, +1, validity_start=now)
        objects = upd.objects
        touched = np.union1d(np.unique(res.dia_object_id), touched_old)
        existing_ids = current["dia_object_id"].to_numpy(np.int64)
        to_close = np.intersect1d(touched, existing_ids)
        emptied = objects["n_dia_sources"].to_numpy() == 0
        new_versions = finalize(objects[np.isin(objects["dia_object_id"], touched) & ~emptied])
        tx.close_versions("dia_object", to_close, now, parts)
        if len(new_versions):
            tx.append("dia_object", conform(t_obj, new_versions, "dia_object versions"), check_keys=False)
        tx.append("dia_source", conform(t_src, sources, where))
    report = IngestReport(
        n_sources=len(sources), n_new_objects=int(res.n_new),
        n_updated_objects=int(np.intersect1d(np.unique(res.dia_object_id), existing_ids).size),
        exposure_ids=exposures.tolist(), validity_start=now, n_replaced_sources=len(old),
        dia_object_ids=res.dia_object_id)
    log.info("associated %d DIASources: %d new objects, %d updated", report.n_sources,
             report.n_new_objects, report.n_updated_objects)
    return report


def _undo(tx, old: pd.DataFrame, exposures: np.ndarray, now: float,
          parts: np.ndarray | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Remove the contribution of stored DIASources of ``exposures`` from their objects.

    Returns the current versions of those objects (all columns) with the
    contribution removed (sums, counts and extremes; derived columns not yet
    finalized), and their ids.  Deletes the old DIASource rows.  ``parts``: the
    footprint's store partitions, where the objects normally are (the others
    are then looked up everywhere).
    """
    ids = np.unique(old["dia_object_id"].dropna().to_numpy(np.int64))
    objects = tx.current_versions("dia_object", ids, partitions=parts)
    missing = np.setdiff1d(ids, objects["dia_object_id"].to_numpy(np.int64))
    if missing.size:
        objects = pd.concat([objects, tx.current_versions("dia_object", missing)], ignore_index=True)
    upd = apply_sources(objects, old.dropna(subset=["dia_object_id"]), -1, validity_start=now)
    objects = upd.objects
    if upd.stale.size:
        rest = tx.select_in("dia_source", "dia_object_id", upd.stale)
        rest = rest[~np.isin(rest["exposure_id"].to_numpy(np.int64), exposures)]
        forced = tx.select_in("dia_forced_source", "dia_object_id", upd.stale)
        objects = recompute_extrema(objects, rest, forced if len(forced) else None, ids=upd.stale)
    tx.delete("dia_source", "dia_source_id", old["dia_source_id"].to_numpy(np.int64))
    return objects, ids


def _with_undone(current: pd.DataFrame, undone: pd.DataFrame) -> pd.DataFrame:
    """The footprint's association columns with the undone objects' values in place
    (same rows, same order), and undone objects outside the footprint appended."""
    ids_c = current["dia_object_id"].to_numpy(np.int64)
    ids_u = undone["dia_object_id"].to_numpy(np.int64)
    pos = pd.Index(ids_u).get_indexer(ids_c)
    hit = pos >= 0
    out = current.copy()
    if hit.any():
        for c in ASSOCIATION_COLUMNS:
            col = out[c].to_numpy(copy=True)
            col[hit] = undone[c].to_numpy(dtype=col.dtype)[pos[hit]]
            out[c] = col
    outside = ~np.isin(ids_u, ids_c)
    if outside.any():
        out = pd.concat([out, undone.loc[outside, ASSOCIATION_COLUMNS]], ignore_index=True)
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
