"""The Python face of the archive.

>>> import archive
>>> arc = archive.open("./my-archive")            # or "postgresql+psycopg://host/db"
>>> arc.cone("dia_object", 150.1, 2.2, 5.0)       # DataFrame, nearest first
>>> arc.sql("SELECT band, count(*) FROM dia_source GROUP BY band")
>>> arc.write("dia_source", frame)                 # validated, atomic

Reads return pandas DataFrames (``as_table=True`` gives an astropy Table with
units from the schema).  Angles in degrees, radii in arcseconds, fluxes in nJy,
times MJD (TAI).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pandas as pd
import pyarrow as pa

from archive.catalog.schema import Schema
from archive.catalog.backends import open_store
from archive.catalog.store import CatalogStore
from archive.errors import ArchiveError

#: Environment variable naming the default archive (path or URL).
REPO_ENV = "ARCHIVE_REPO"


def resolve_repo(target: str | os.PathLike | None) -> str:
    """The archive location: ``target`` if given, else ``$ARCHIVE_REPO``."""
    if target:
        return os.fspath(target)
    env = os.environ.get(REPO_ENV)
    if env:
        return env
    raise ArchiveError(f"no archive given: pass --repo PATH|URL or set {REPO_ENV}")


def _to_astropy(df: pd.DataFrame, schema: Schema, table: str | None):
    from astropy.table import Table as AstropyTable
    import astropy.units as u

    out = AstropyTable.from_pandas(df)
    if table is not None:
        t = schema[table]
        for name in out.colnames:
            if name in t and t.column(name).unit:
                try:
                    out[name].unit = u.Unit(t.column(name).unit.replace("deg2", "deg**2"), parse_strict="silent")
                except ValueError:
                    pass
            if name in t:
                out[name].description = t.column(name).description
        if "distance_arcsec" in out.colnames:
            out["distance_arcsec"].unit = u.arcsec
    return out


class Archive:
    """An open archive: query and write the catalog store."""

    def __init__(self, store: CatalogStore, location: str) -> None:
        self.store = store
        self.location = location

    @classmethod
    def open(cls, target: str | os.PathLike | None = None, create: bool = False, **kwargs) -> Archive:
        """Open (or with ``create=True`` initialise) the archive at a directory or Postgres URL."""
        location = resolve_repo(target)
        return cls(open_store(location, create=create, **kwargs), location)

    @classmethod
    def init(cls, target: str | os.PathLike, **kwargs) -> Archive:
        """Create a new, empty archive (directory) or bring a database to the schema head."""
        return cls.open(target, create=True, **kwargs)

    def recover(self) -> int:
        """Parquet archive: restore a corrupt or missing manifest.json from the newest intact
        committed manifest kept in ``_manifests/``; returns its generation."""
        if self.backend != "parquet":
            raise ArchiveError("recover applies to a Parquet archive (PostgreSQL recovers itself)")
        return self.store.recover_manifest()

    @property
    def schema(self) -> Schema:
        return self.store.schema

    @property
    def backend(self) -> str:
        return self.store.backend

    def _out(self, df: pd.DataFrame, as_table: bool, table: str | None):
        return _to_astropy(df, self.schema, table) if as_table else df

    def _versions(self, table: str, columns, fetch, as_of: float | None):
        """Versioned tables (dia_object): keep the version valid now, or at MJD ``as_of``."""
        t = self.store.table(table)
        if "validity_start" not in t:
            if as_of is not None:
                raise ArchiveError(f"table {table!r} has no versions; as_of applies to dia_object")
            return fetch(columns, False)
        need = None if columns is None else list(dict.fromkeys(list(columns) + ["validity_start", "validity_end"]))
        # ``fetch(columns, current_only)``: for "now" the store keeps only the current versions
        # itself (on Postgres through the index of current versions) where it can
        df = fetch(need, as_of is None)
        end = df["validity_end"]
        if as_of is None:
            keep = end.isna()
        else:
            keep = (df["validity_start"] <= as_of) & (end.isna() | (end > as_of))
        df = df[keep.to_numpy()].reset_index(drop=True)
        if columns is not None:
            df = df[[c for c in df.columns if c in columns or c == "distance_arcsec"]]
        return df

    def cone(self, table: str, ra: float, dec: float, radius_arcsec: float,
             columns: Sequence[str] | None = None, as_table: bool = False, as_of: float | None = None):
        """Rows of ``table`` within ``radius_arcsec`` of (``ra``, ``dec``) in degrees, nearest first.

        Adds ``distance_arcsec``.  Exact at HEALPix pixel edges, the poles and RA 0/360.
        For ``dia_object`` only the current version of each object is returned,
        or with ``as_of`` (MJD TAI) the version the archive held at that time.
        """
        df = self._versions(table, columns, lambda c, cur: self.store.cone(table, ra, dec, radius_arcsec, c, cur),
                            as_of)
        return self._out(df, as_table, table)

    def region(self, table: str, region, columns: Sequence[str] | None = None, as_table: bool = False,
               as_of: float | None = None):
        """Rows inside an :mod:`archive.sky.regions` region (Cone, Box, Polygon)."""
        df = self._versions(table, columns, lambda c, cur: self.store.query_region(table, region, c, cur),
                            as_of)
        return self._out(df, as_table, table)

    def get(self, table: str, ids, columns: Sequence[str] | None = None, as_table: bool = False,
            as_of: float | None = None):
        """Rows whose id (first primary-key column) is in ``ids`` (current versions for dia_object)."""
        if isinstance(ids, (int, str)):
            ids = [ids]
        df = self._versions(table, columns, lambda c, cur: self.store.get(table, list(ids), c), as_of)
        return self._out(df, as_table, table)

    def history(self, dia_object_id: int) -> pd.DataFrame:
        """Every stored version of one DIAObject, oldest first."""
        df = self.store.get("dia_object", [int(dia_object_id)])
        return df.sort_values("validity_start").reset_index(drop=True)

    # -- DIA ingest and light curves ------------------------------------------
    def ingest_dia_sources(self, data, radius_arcsec: float | None = None, replace: bool = False,
                           ingest_mjd: float | None = None, where: str | None = None):
        """Associate a batch of DIASources (one or more visits) and store sources and object versions.

        Returns an :class:`archive.catalog.dia_ingest.IngestReport`.  Exposures
        already ingested are refused unless ``replace=True``.  ``radius_arcsec``:
        match radius for every row; default 1", and a survey's own for its rows
        (ZTF 1.5"; see docs/association.md).  Visits may arrive in any order: a
        late one re-associates the objects it affects in time order.
        """
        from archive.catalog.dia_ingest import AssociationConfig, ingest_dia_sources

        return ingest_dia_sources(self.store, data, AssociationConfig(radius_arcsec=radius_arcsec),
                                  replace=replace, ingest_mjd=ingest_mjd, where=where)

    def ingest_forced(self, data, ingest_mjd: float | None = None) -> int:
        """Store forced photometry rows and update their objects' forced-flux summaries."""
        from archive.catalog.dia_ingest import ingest_forced_sources

        return ingest_forced_sources(self.store, data, ingest_mjd=ingest_mjd)

    def ingest_alerts(self, paths: Sequence[str | os.PathLike], radius_arcsec: float | None = None,
                      ingest_mjd: float | None = None):
        """Read ZTF / LSST alert packets (Avro, Parquet, tar.gz) and associate their detections.

        Detections already stored (same survey ``external_id``) are skipped, so
        overlapping packets never count a detection twice.
        """
        from archive.catalog.alerts import read_alert_files
        from archive.catalog.dia_ingest import AssociationConfig, ingest_dia_sources

        rows = read_alert_files(paths)
        return ingest_dia_sources(self.store, rows, AssociationConfig(radius_arcsec=radius_arcsec),
                                  ingest_mjd=ingest_mjd, skip_known_external=True,
                                  where=", ".join(map(os.fspath, paths)))

    def reassociate(self, region=None, radius_arcsec: float | None = None,
                    ingest_mjd: float | None = None):
        """Rebuild the DIAObjects of ``region`` (an :mod:`archive.sky.regions` region; None:
        everything) from their DIASources, visit by visit in time order.

        Every object with a DIASource in the region is rebuilt whole; objects keep
        their ids where a rebuilt object took most of an old one's sources, and
        get new versions (history kept).  Returns an
        :class:`archive.catalog.dia_ingest.IngestReport`.
        """
        from archive.catalog.dia_ingest import AssociationConfig, reassociate

        return reassociate(self.store, region, AssociationConfig(radius_arcsec=radius_arcsec),
                           ingest_mjd=ingest_mjd)

    def light_curve(self, dia_object_id: int, bands: Sequence[str] | None = None) -> pd.DataFrame:
        """Detections and forced photometry of one DIAObject in one table, by time.

        Columns: ``mjd`` (TAI), ``band``, ``flux``, ``flux_err`` (nJy, difference
        image PSF flux), ``science_flux``, ``science_flux_err`` (nJy, direct image),
        ``kind`` ("detection" | "forced"), ``exposure_id``, ``source_id``.
        """
        oid = int(dia_object_id)
        if self.get("dia_object", [oid], columns=["dia_object_id"]).empty:
            from archive.errors import NotFoundError

            raise NotFoundError(f"no dia_object with id {oid}")
        q = ("SELECT mjd, band, psf_flux AS flux, psf_flux_err AS flux_err, science_flux, science_flux_err, "
             "'{kind}' AS kind, exposure_id, {idcol} AS source_id FROM {table} WHERE dia_object_id = {oid}")
        det = self.store.sql(q.format(kind="detection", idcol="dia_source_id", table="dia_source", oid=oid))
        frc = self.store.sql(q.format(kind="forced", idcol="dia_forced_source_id", table="dia_forced_source", oid=oid))
        df = pd.concat([d for d in (det, frc) if len(d)], ignore_index=True) if (len(det) or len(frc)) else det
        if bands:
            df = df[df["band"].isin(list(bands))]
        return df.sort_values(["mjd", "kind"], kind="stable").reset_index(drop=True)

    def sql(self, query: str, as_table: bool = False, timeout: float | None = None):
        """Run one read-only SQL query (PostgreSQL dialect; DuckDB on the Parquet store).

        Only a single SELECT (or EXPLAIN of one, without ANALYZE) runs; anything
        else, and functions that would touch files, other servers, locks or
        settings, are refused with :class:`~archive.errors.ReadOnlyError`.
        ``timeout``: seconds before the query is cancelled (default 300).
        """
        return self._out(self.store.sql(query, timeout=timeout), as_table, None)

    def write(self, table: str, data, where: str | None = None) -> int:
        """Validate rows (DataFrame, Arrow or astropy Table) against the schema and append them atomically.

        Returns the number of rows written; on any error nothing is written.
        """
        return self.store.write(table, data, where=where)

    def read_files(self, table: str, paths: Sequence[str | os.PathLike]) -> pa.Table:
        """Read catalog files (Parquet, CSV, FITS) for ``table``, each validated against the
        schema on its own (errors name the file, column and rows), as one Arrow table."""
        from archive.catalog.tablefile import read_table_file
        from archive.catalog.validate import conform

        if not paths:
            raise ArchiveError("no files given")
        t = self.store.table(table)
        arrows = [conform(t, read_table_file(p), where=os.fspath(p)) for p in paths]
        return pa.concat_tables(arrows) if len(arrows) > 1 else arrows[0]

    def ingest_files(self, table: str, paths: Sequence[str | os.PathLike]) -> int:
        """Read catalog files (Parquet, CSV, FITS) and write them as ONE atomic batch.

        Every file is read and validated before anything is written; an error
        names the file, column and rows, and leaves the archive untouched.
        """
        return self.store.write(table, self.read_files(table, paths), where=", ".join(map(os.fspath, paths)))

    # -- matched sources (direct-image sources across epochs) --------------------
    def ingest_sources(self, data, radius_arcsec: float = 1.0, replace: bool = False):
        """Match per-epoch ``source`` rows into ``matched_source`` objects and store both atomically."""
        from archive.catalog.matched_ingest import ingest_sources

        return ingest_sources(self.store, data, radius_arcsec=radius_arcsec, replace=replace)

    def relative_photometry(self, region, band: str, **fit_options):
        """Per-epoch zero-point offsets from the region's constant stars, and corrected light curves."""
        from archive.catalog.matched_ingest import relative_photometry

        return relative_photometry(self.store, region, band, **fit_options)

    def rms_curve(self, region, band: str, relative: bool = True, plot=None) -> pd.DataFrame:
        """The rms-versus-magnitude diagnostic of a field (optionally drawn to ``plot``)."""
        from archive.catalog.matched_ingest import rms_curve

        return rms_curve(self.store, region, band, relative=relative, plot=plot)

    def epoch_matrix(self, region, band: str, property: str = "psf_flux", relative: bool = False,
                     path=None) -> pd.DataFrame:
        """Epochs x matched sources matrix of a source column (NaN where unseen); written to
        ``path`` (.parquet or .h5) when given."""
        from archive.catalog.matched_ingest import export_epoch_matrix, field_epoch_matrix

        if path is not None:
            return export_epoch_matrix(self.store, region, band, property, path, relative=relative)[1]
        return field_epoch_matrix(self.store, region, band, property, relative=relative)

    # -- processing ------------------------------------------------------------
    def products_root(self, products: str | os.PathLike | None = None):
        """Where image products go: ``products`` if given, else ARCHIVE/products for a directory archive."""
        import pathlib

        if products is not None:
            return pathlib.Path(products)
        root = getattr(self.store, "root", None)
        if root is None:
            raise ArchiveError("a Postgres archive needs --products DIR for its image files")
        return pathlib.Path(root) / "products"

    def process_raws(self, raw_paths, calib_paths, refcat=None, products=None, workers: int = 1,
                     config=None):
        """Raw frames -> calexp FITS files + exposure/source/image_product/provenance rows.

        Resumable: exposures already archived are skipped.  ``refcat``: DataFrame
        or file (ra, dec, band magnitudes) for astrometric and photometric calibration.
        Returns an :class:`archive.pipeline.single_epoch.RunReport`.
        """
        from archive.pipeline.single_epoch import ProcessConfig, process_raws

        if refcat is not None and not isinstance(refcat, pd.DataFrame):
            from archive.catalog.tablefile import read_table_file

            refcat = read_table_file(refcat).to_pandas()
        cfg = ProcessConfig(workers=workers, single_frame=config)
        return process_raws(self.store, list(raw_paths), list(calib_paths), refcat,
                            self.products_root(products), cfg)

    # -- the pipeline: registered inputs, steps, runs ---------------------------------
    def ingest_images(self, paths: Sequence[str | os.PathLike]):
        """Register input FITS files: raw science and calibration frames, or other pipelines'
        calibrated IMAGE/MASK/VARIANCE exposures.  All or nothing: a batch with a bad file
        registers none (the error names each); files already registered (same contents) are
        skipped.  Returns an :class:`archive.pipeline.inputs.RegisterReport`."""
        from archive.pipeline.inputs import register_inputs

        return register_inputs(self.store, list(paths))

    def ingest_refcat(self, source, products=None) -> str:
        """Register a reference catalog (file or DataFrame: ra, dec in deg, band magnitudes)
        for astrometric and photometric calibration by later runs; returns its stored path."""
        from archive.pipeline.inputs import register_refcat

        return register_refcat(self.store, source, self.products_root(products))[0]

    def runner(self, config: dict | None = None, products=None, jobs: int = 1, executor: str = "local",
               scheduler: str | None = None, progress: bool | None = None):
        """A :class:`archive.pipeline.runner.Runner` over every step (``config``: step name ->
        settings), on ``jobs`` local processes or a Dask cluster (``executor="dask"``,
        ``scheduler``: its address)."""
        from archive.pipeline.chain import build_steps
        from archive.pipeline.inputs import current_refcat
        from archive.pipeline.products import ProductStore
        from archive.pipeline.runner import DaskExecutor, LocalExecutor, Runner
        from archive.pipeline.steps import RunContext

        steps = build_steps(config)
        if executor == "local":
            ex = LocalExecutor(jobs)
        elif executor == "dask":
            ex = DaskExecutor(scheduler)
        else:
            raise ArchiveError(f"executor {executor!r}: use local or dask")
        refcat, sha = current_refcat(self.store)
        ctx = RunContext(self.store, ProductStore(self.products_root(products), self.store), refcat, sha)
        return Runner(ctx, steps, ex, progress=progress)

    def run(self, until: str | None = None, visits=None, bands=None, config: dict | None = None,
            products=None, jobs: int = 1, executor: str = "local", scheduler: str | None = None,
            retry_failed: bool = False, progress: bool | None = None):
        """Run every pending unit of every step (up to ``until``) in dependency order;
        returns {step: :class:`archive.pipeline.runner.StepReport`}."""
        runner = self.runner(config, products, jobs, executor, scheduler, progress)
        try:
            return runner.run(until=until, visits=visits, bands=bands, retry_failed=retry_failed)
        finally:
            runner.executor.close()

    def status(self, config: dict | None = None, products=None) -> pd.DataFrame:
        """Per step: units registered, done, pending, stale and failed (with the reasons)."""
        return self.runner(config, products).status()

    def count(self, table: str) -> int:
        return self.store.count(table)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Archive({self.location!r}, backend={self.backend!r})"
