"""Matched sources in the store: per-epoch ``source`` rows in, ``matched_source`` rows out.

The store side of LAST-style MatchedSources (the pure parts are in
:mod:`archive.catalog.matched`).

Ingest (:func:`ingest_sources`), for one batch of direct-image ``source`` rows
(one or several epochs), inside one store transaction:

1. validate the rows against ``source`` (:func:`archive.catalog.validate.conform`);
   a ``matched_source_id`` column in the input is ignored (matching decides it);
2. refuse exposures already stored, or with ``replace=True`` delete their old
   rows first and recompute the matched sources they belonged to (a matched
   source left without detections is deleted), so nothing is counted twice;
3. load the ``matched_source`` rows of the batch's footprint plus a margin
   (HEALPix pixels holding the sources and their neighbours, at an order whose
   pixels are wider than four match radii), so matches across partition
   borders, RA 0/360 and the poles are found;
4. match with the same optimal, visit-by-visit association as DIASources
   (:func:`archive.catalog.matched.match_sources`); a source without a partner
   founds a new matched source;
5. delete the touched ``matched_source`` rows and append their new summaries
   and the ``source`` rows (with ``matched_source_id`` set); the transaction
   commits all of it at once or nothing.

``matched_source`` is not versioned and holds no running sums, so the
summaries of the *touched* matched sources are recomputed from all their
detections (``select_in`` by ``matched_source_id`` within the footprint's
partitions) with :func:`archive.catalog.matched.summarize`.  The cost is
therefore proportional to the batch, its footprint and the number of epochs of
the touched sources, never to the whole archive.  The summary fluxes are the
fluxes as stored (calibrated nJy, before relative photometry); the
relative-photometry functions below correct light curves at query time.

On Postgres, transaction-level advisory locks on the order-6 pixels of the
footprint (taken in sorted order) serialize batches whose footprints overlap,
so two processes never found the same matched source twice; the lock is taken
before the stored exposures are looked up, so a concurrent ingest of the same
exposure waits and is then refused.  The Parquet store has a single writer
lock (a second writer gets :class:`~archive.errors.StoreLockedError`).

Source rows already stored without matching (a plain ``store.write``) are
matched by ingesting the same rows again with ``replace=True``.

Query helpers work on any region the stores accept (Cone, Box, Polygon,
PixelSet): :func:`field_epochs`, :func:`relative_photometry`,
:func:`rms_curve`, :func:`field_epoch_matrix` and :func:`export_epoch_matrix`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from archive.catalog import matched as M
from archive.catalog.store import CatalogStore, frame_from_arrow
from archive.catalog.validate import conform
from archive.errors import ArchiveError, NotFoundError, ValidationError
from archive.sky.healpix import partition_pixel
from archive.sky.regions import PixelSet

log = logging.getLogger(__name__)

#: Advisory-lock namespace for matched-source ingest (DIA association uses 0x0A55).
LOCK_KEY = 0x0A57
#: Order of the advisory-lock pixels (~0.9 deg).
LOCK_ORDER = 6


def footprint_order(radius_arcsec: float) -> int:
    """Finest HEALPix order (<= 10) whose pixels are wider than 4 match radii."""
    if not (np.isfinite(radius_arcsec) and radius_arcsec > 0):
        raise ValidationError(f"match radius must be a positive number of arcsec; got {radius_arcsec}")
    k = int(np.floor(np.log2(58.6 * 3600.0 / (4.0 * radius_arcsec))))
    return int(min(max(k, 0), 10))


@dataclass
class MatchedIngestReport:
    """What one :func:`ingest_sources` batch did."""

    n_sources: int
    n_new: int
    n_updated: int
    exposure_ids: list[int]
    n_replaced_sources: int = 0
    n_removed: int = 0
    matched_source_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64), repr=False)


def _lock(tx, region: PixelSet, held: np.ndarray | None = None) -> np.ndarray:
    """Advisory locks (Postgres) on the order-6 pixels of ``region`` not in ``held``;
    returns all pixels held.  A no-op on stores without them (Parquet has one writer)."""
    pix = region.pixels_at(LOCK_ORDER)
    held = np.empty(0, np.int64) if held is None else held
    if hasattr(tx, "lock_partitions"):
        tx.lock_partitions(LOCK_KEY, np.setdiff1d(pix, held))
    return np.union1d(pix, held)


def _store_partitions(store: CatalogStore, region: PixelSet) -> np.ndarray | None:
    """Partition pixels of a Parquet store covering ``region`` (a read hint; None elsewhere)."""
    order = getattr(store, "order", None)
    if order is None:
        return None
    parts = [partition_pixel(np.array([a, b - 1], dtype=np.int64), order)
             for a, b in region.pixel_ranges()]
    if not parts:
        return np.empty(0, np.int64)
    lo_hi = np.stack(parts)
    return np.unique(np.concatenate([np.arange(lo, hi + 1) for lo, hi in lo_hi]))


def _ids(df: pd.DataFrame, col: str) -> np.ndarray:
    return df[col].dropna().to_numpy(np.int64)


def ingest_sources(store: CatalogStore, sources_df, radius_arcsec: float = 1.0,
                   replace: bool = False, *, use_errors: bool = True,
                   where: str | None = None) -> MatchedIngestReport:
    """Match a batch of per-epoch ``source`` rows into ``matched_source`` objects, atomically.

    Parameters
    ----------
    store : the catalog store.
    sources_df : ``source`` rows (DataFrame or Arrow table), one or several
        epochs; positions in degrees, fluxes in nJy, ``mjd`` MJD (TAI).
    radius_arcsec : match radius (arcsec).
    replace : re-ingest exposures already stored: their old rows are deleted
        and the matched sources they belonged to recomputed first.  Without
        it, a batch holding a stored exposure is refused
        (:class:`~archive.errors.ArchiveError`) and nothing is written.
    use_errors : score candidate pairs by Gaussian likelihood where
        positional errors exist (else by separation).
    where : names the input (a file) in error messages.

    Summaries of the touched matched sources are recomputed from all their
    detections (the schema has no running sums for ``matched_source``); see
    the module docstring for the cost.
    """
    order = footprint_order(radius_arcsec)
    t_src = store.table("source")
    t_ms = store.table("matched_source")
    if isinstance(sources_df, pd.DataFrame) and "matched_source_id" in sources_df.columns:
        sources_df = sources_df.drop(columns=["matched_source_id"])
    elif isinstance(sources_df, pa.Table) and "matched_source_id" in sources_df.column_names:
        sources_df = sources_df.drop_columns(["matched_source_id"])
    sources = frame_from_arrow(conform(t_src, sources_df, where))
    if sources.empty:
        raise ValidationError(f"{where or 'source batch'}: no rows")
    exposures = np.unique(sources["exposure_id"].to_numpy(np.int64))

    with store.transaction() as tx:
        # lock the batch's footprint before looking for its exposures, so a concurrent
        # ingest of the same exposures waits and then finds them stored
        region = PixelSet.around(sources["ra"].to_numpy(float), sources["dec"].to_numpy(float), order)
        locked = _lock(tx, region)
        old = tx.select_in("source", "exposure_id", exposures)
        if len(old) and not replace:
            seen = sorted(set(old["exposure_id"].astype("int64").tolist()))
            raise ArchiveError(f"exposure(s) {seen[:10]} already ingested ({len(old)} source rows); "
                               "use --replace (replace=True) to re-ingest them")
        if len(old):
            ra = np.concatenate([sources["ra"].to_numpy(float), old["ra"].to_numpy(float)])
            dec = np.concatenate([sources["dec"].to_numpy(float), old["dec"].to_numpy(float)])
            region = PixelSet.around(ra, dec, order)
            _lock(tx, region, locked)  # old rows elsewhere on the sky (rare): lock there too
        parts = _store_partitions(store, region)
        current = tx.query_region("matched_source", region)
        touched_old = np.empty(0, np.int64)
        if len(old):
            old_ids = np.unique(_ids(old, "matched_source_id"))
            tx.delete("source", "source_id", old["source_id"].to_numpy(np.int64), parts)
            rest = tx.select_in("source", "matched_source_id", old_ids, parts) if old_ids.size \
                else old.iloc[:0]
            # rows of the replaced exposures are gone from this transaction's view already
            refreshed = M.summarize(rest) if len(rest) else current.iloc[:0]
            current = pd.concat([current[~current["matched_source_id"].isin(old_ids)], refreshed],
                                ignore_index=True)
            touched_old = old_ids
        res = M.match_sources(sources, current, radius_arcsec, use_errors=use_errors)
        sources["matched_source_id"] = res.dia_object_id
        existing = np.intersect1d(np.unique(res.dia_object_id[~res.is_new]),
                                  current["matched_source_id"].to_numpy(np.int64))
        # full detections of every touched matched source: stored ones + this batch
        refresh = np.union1d(existing, touched_old)
        stored = tx.select_in("source", "matched_source_id", refresh, parts) if refresh.size \
            else sources.iloc[:0]
        allsrc = pd.concat([stored, sources], ignore_index=True) if len(stored) else sources
        summary = M.summarize(allsrc)
        emptied = np.setdiff1d(touched_old, summary["matched_source_id"].to_numpy(np.int64))
        if refresh.size:  # old rows of every touched matched source (emptied ones included)
            tx.delete("matched_source", "matched_source_id", refresh, parts)
        tx.append("matched_source", conform(t_ms, summary, "matched_source rows"), check_keys=False)
        tx.append("source", conform(t_src, sources, where))
    n_upd = int(np.setdiff1d(existing, emptied).size)
    report = MatchedIngestReport(
        n_sources=len(sources), n_new=int(res.n_new), n_updated=n_upd,
        exposure_ids=exposures.tolist(), n_replaced_sources=len(old), n_removed=int(emptied.size),
        matched_source_ids=res.dia_object_id)
    log.info("matched %d sources: %d new matched sources, %d updated, %d removed",
             report.n_sources, report.n_new, report.n_updated, report.n_removed)
    return report


# --------------------------------------------------------------------------- queries
def _check_band(store: CatalogStore, band: str | None) -> None:
    if band is not None and band not in store.schema.bands:
        raise ValidationError(f"unknown band {band!r}; the schema has {list(store.schema.bands)}")


def field_epochs(store: CatalogStore, region, band: str | None = None,
                 radius_arcsec: float = 1.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The matched sources in ``region`` and all their detections.

    Returns ``(sources, matched)``: ``matched`` are the ``matched_source``
    rows whose mean position lies in ``region``; ``sources`` are all their
    ``source`` rows (also those just outside the region), optionally of one
    ``band``, sorted by matched_source_id and mjd.  ``radius_arcsec`` is the
    match radius used at ingest (it sets the margin searched for detections).
    Raises :class:`~archive.errors.NotFoundError` when the region holds no
    matched source.
    """
    _check_band(store, band)
    matched = store.query_region("matched_source", region)
    if matched.empty:
        raise NotFoundError(f"no matched sources in {region!r}")
    around = PixelSet.around(matched["ra"].to_numpy(float), matched["dec"].to_numpy(float),
                             footprint_order(radius_arcsec))
    src = store.query_region("source", around)
    keep = src["matched_source_id"].isin(set(matched["matched_source_id"].tolist())).to_numpy(bool)
    if band is not None:
        keep = keep & (src["band"].astype("string") == band).to_numpy(bool, na_value=False)
    src = src[keep].copy()
    src["matched_source_id"] = src["matched_source_id"].astype(np.int64)
    src = src.sort_values(["matched_source_id", "mjd"], kind="stable").reset_index(drop=True)
    return src, matched.sort_values("matched_source_id").reset_index(drop=True)


@dataclass
class RelativePhotometry:
    """Result of :func:`relative_photometry`.

    light_curves : the field's ``source`` rows of the band with ``psf_flux``,
        ``psf_flux_err`` and aperture fluxes corrected by their epoch's offset
        (nJy) and a ``zp`` column (mag, the offset that was removed).
    zero_points : one row per exposure: ``band``, ``exposure_id``, ``zp``
        (mag; observed magnitudes minus zp are on the common scale, median
        zp = 0), ``zp_err`` (mag), ``n_stars``, and ``mjd``.
    reference : matched_source_ids used as constant stars.
    rms_before, rms_after : median magnitude rms of the reference stars
        before and after correction (mag).
    matched : the field's ``matched_source`` rows.
    """

    light_curves: pd.DataFrame
    zero_points: pd.DataFrame
    reference: np.ndarray
    rms_before: float
    rms_after: float
    matched: pd.DataFrame


def relative_photometry(store: CatalogStore, region, band: str, **fit_options) -> RelativePhotometry:
    """Solve each epoch's zero-point offset from the field's constant stars and apply it.

    ``fit_options`` go to :func:`archive.catalog.matched.relative_zero_points`
    (``min_epochs``, ``max_mag_err``, ``clip``, ``max_var_chi2``...).
    """
    if band is None:
        raise ValidationError("relative photometry needs a band")
    sources, matched = field_epochs(store, region, band)
    if sources.empty:
        raise NotFoundError(f"no {band}-band detections of the matched sources in {region!r}")
    fit = M.relative_zero_points(sources, **fit_options)
    lc = M.apply_zero_points(sources, fit.zero_points)
    mjd = sources.groupby("exposure_id")["mjd"].min()
    zps = fit.zero_points.assign(mjd=mjd.reindex(fit.zero_points["exposure_id"].to_numpy()).to_numpy())
    zps = zps.sort_values("mjd", kind="stable").reset_index(drop=True)
    log.info("relative photometry %s: %d epochs, %d reference stars, rms %.4f -> %.4f mag",
             band, len(zps), fit.reference.size, fit.rms_before, fit.rms_after)
    return RelativePhotometry(lc, zps, fit.reference, fit.rms_before, fit.rms_after, matched)


def rms_with_model(table: pd.DataFrame, *, bin_mag: float = 0.5, min_per_bin: int = 5,
                   clip: float = 4.0) -> pd.DataFrame:
    """Add the noise-limited rms curve and outlier flags to an rms-vs-mag table.

    ``rms_model`` (mag) is the median rms of the sources in ``bin_mag``-wide
    magnitude bins (per band; bins with fewer than ``min_per_bin`` sources
    merge into their neighbours through interpolation), interpolated at each
    source's mean magnitude.  ``excess = rms_mag / rms_model``; ``outlier``
    marks sources whose log excess exceeds ``clip`` robust sigmas of the log
    excess of the whole field (variables, blends, bad matches).
    """
    out = table.copy()
    out["rms_model"] = np.nan
    for _band, t in out.groupby("band"):
        mag = t["mean_mag"].to_numpy(float)
        rms = t["rms_mag"].to_numpy(float)
        ok = np.isfinite(mag) & np.isfinite(rms) & (rms > 0)
        if ok.sum() < min_per_bin:
            continue
        edges = np.arange(np.floor(mag[ok].min() / bin_mag) * bin_mag,
                          mag[ok].max() + bin_mag, bin_mag)
        k = np.digitize(mag[ok], edges)
        centres, meds = [], []
        for b in np.unique(k):
            sel = k == b
            if sel.sum() >= min_per_bin:
                centres.append(np.median(mag[ok][sel]))
                meds.append(np.median(rms[ok][sel]))
        if not centres:
            centres, meds = [np.median(mag[ok])], [np.median(rms[ok])]
        model = np.exp(np.interp(mag, centres, np.log(meds)))
        out.loc[t.index, "rms_model"] = model
    with np.errstate(divide="ignore", invalid="ignore"):
        out["excess"] = out["rms_mag"] / out["rms_model"]
        lx = np.log(out["excess"].to_numpy(float))
    good = np.isfinite(lx)
    if good.any():
        med = np.median(lx[good])
        sig = 1.4826 * np.median(np.abs(lx[good] - med))
        out["outlier"] = good & (lx - med > clip * max(sig, 1e-3))
    else:
        out["outlier"] = False
    return out


def rms_curve(store: CatalogStore, region, band: str, *, relative: bool = True,
              min_epochs: int = 3, plot: str | os.PathLike | None = None) -> pd.DataFrame:
    """The field's rms-versus-magnitude diagnostic.

    One row per matched source of ``band`` seen on at least ``min_epochs``
    epochs: ``matched_source_id``, ``band``, ``mean_mag`` (AB), ``rms_mag``
    (mag), ``n``, ``rms_model``, ``excess`` and ``outlier`` (see
    :func:`rms_with_model`), ``ra``, ``dec``.  ``relative=True`` uses the
    light curves after relative photometry.  ``plot``: also draw it into an
    image file (:func:`archive.catalog.matched.plot_rms_vs_mag`).
    """
    if relative:
        sources = relative_photometry(store, region, band).light_curves
    else:
        sources, _ = field_epochs(store, region, band)
    table = M.rms_vs_mag(sources, min_epochs=min_epochs)
    if table.empty:
        raise NotFoundError(f"no matched source in {region!r} has {min_epochs}+ {band}-band epochs")
    table = rms_with_model(table)
    pos = sources.groupby("matched_source_id")[["ra", "dec"]].mean()
    table["ra"] = pos["ra"].reindex(table["matched_source_id"].to_numpy()).to_numpy()
    table["dec"] = pos["dec"].reindex(table["matched_source_id"].to_numpy()).to_numpy()
    if plot is not None:
        M.plot_rms_vs_mag(table, plot)
    return table.sort_values("mean_mag", kind="stable").reset_index(drop=True)


def field_epoch_matrix(store: CatalogStore, region, band: str, property: str = "psf_flux",
                       *, relative: bool = False) -> pd.DataFrame:
    """Epochs x matched sources matrix of a ``source`` column (NaN where a source was not seen).

    Rows: ``exposure_id`` of every ``band`` epoch on which any matched source
    of the region was detected, in time order; columns: ``matched_source_id``.
    ``relative=True`` applies the relative-photometry offsets to flux columns
    first.
    """
    t = store.table("source")
    if property not in t:
        raise ValidationError(f"table 'source' has no column {property!r}")
    if t.column(property).type == "string":
        raise ValidationError(f"source column {property!r} is not numeric")
    if relative:
        sources = relative_photometry(store, region, band).light_curves
    else:
        sources, _ = field_epochs(store, region, band)
    if sources.empty:
        raise NotFoundError(f"no {band}-band detections of the matched sources in {region!r}")
    # a separate value column: epoch_matrix also selects ``mjd`` for the row order
    sources = sources.assign(_value=pd.to_numeric(sources[property]).astype("float64"))
    mat = M.epoch_matrix(sources, "_value")
    mat.columns.name = "matched_source_id"
    return mat


def export_epoch_matrix(store: CatalogStore, region, band: str, property: str,
                        path: str | os.PathLike, *, relative: bool = False) -> tuple[Path, pd.DataFrame]:
    """Write :func:`field_epoch_matrix` to ``.parquet`` or ``.h5``/``.hdf5``; returns (path, matrix)."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".parquet", ".h5", ".hdf5"):
        raise ValidationError(f"{path}: the matrix file must end in .parquet, .h5 or .hdf5")
    mat = field_epoch_matrix(store, region, band, property, relative=relative)
    return M.export_matrix(mat, path), mat
