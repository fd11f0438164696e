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
from typing import TYPE_CHECKING

from archive.errors import ArchiveError, NotFoundError

if TYPE_CHECKING:  # the heavy modules load on first use, so `import archive.api` stays light
    import pandas as pd

    from archive.catalog.schema import Schema
    from archive.catalog.store import CatalogStore

#: Environment variable naming the default archive (path or URL).
REPO_ENV = "ARCHIVE_REPO"

#: Magnitudes and upper limits of light curves: S/N below which a flux is a limit.
LIMIT_SNR = 5.0
#: AB magnitude of 1 nJy.
AB_NJY_ZP = 31.4

#: Columns Archive adds to what it reads (unit, UCD, description), for self-describing outputs.
DERIVED_COLUMNS = {
    "distance_arcsec": {"unit": "arcsec", "ucd": "pos.angDistance",
                        "description": "Angular distance from the cone centre."},
    "flux": {"unit": "nJy", "ucd": "phot.flux;arith.diff", "description": "PSF flux on the difference image."},
    "flux_err": {"unit": "nJy", "ucd": "stat.error;phot.flux;arith.diff", "description": "Uncertainty of flux."},
    "kind": {"unit": None, "ucd": "meta.code.class",
             "description": "detection (a DIASource) or forced (forced photometry)."},
    "source_id": {"unit": None, "ucd": "meta.id",
                  "description": "dia_source_id of a detection, dia_forced_source_id of forced photometry."},
    "mag": {"unit": "mag", "ucd": "phot.mag",
            "description": f"AB magnitude of flux where flux >= {LIMIT_SNR:g} x flux_err (else null)."},
    "mag_err": {"unit": "mag", "ucd": "stat.error;phot.mag", "description": "Uncertainty of mag."},
    "mag_limit": {"unit": "mag", "ucd": "phot.mag;stat.max",
                  "description": f"{LIMIT_SNR:g}-sigma upper limit (AB) where flux < {LIMIT_SNR:g} x flux_err "
                                 "(else null)."},
}


def _is_url(location: str) -> bool:
    return "://" in location


def resolve_repo(target: str | os.PathLike | None) -> str:
    """The archive location: ``target`` if given, else ``$ARCHIVE_REPO``; a directory as
    an absolute path (a relative one is read against the current directory)."""
    if target:
        location = os.fspath(target)
    else:
        location = os.environ.get(REPO_ENV)
        if not location:
            raise ArchiveError(f"no archive given: pass --repo PATH|URL or set {REPO_ENV}")
    if _is_url(location):
        return location
    return os.path.abspath(os.path.expanduser(location))


def _check_exists(target, location: str) -> None:
    """A directory archive that is not there: say where it was looked for, and why there."""
    if _is_url(location) or os.path.exists(location):
        return
    env = os.environ.get(REPO_ENV, "")
    if not target and env and not os.path.isabs(os.path.expanduser(env)):
        raise NotFoundError(f"no archive at {location}: ${REPO_ENV}={env} is a relative path, read from the "
                            f"current directory {os.getcwd()}; set it to the archive's absolute path "
                            f"(export {REPO_ENV}=/absolute/path/to/archive)")
    raise NotFoundError(f"no archive at {location} (create one with `archive init {location}`)")


def astropy_table(df: pd.DataFrame, meta: dict[str, dict]):
    """``df`` as an astropy Table with each column's unit, description and UCD (``meta``:
    column -> unit, ucd, description); times become ISO 8601 UTC strings."""
    from astropy.table import Table as AstropyTable

    from archive.catalog.schema import astropy_unit

    times = [c for c in df.columns if df[c].dtype.kind == "M"]
    if times:
        df = df.copy()
        for c in times:
            df[c] = [None if v is None or v != v else v.isoformat() for v in df[c]]
    out = AstropyTable.from_pandas(df)
    for name in out.colnames:
        m = meta.get(name)
        if not m:
            continue
        if m.get("unit"):
            out[name].unit = astropy_unit(m["unit"])
        if m.get("description"):
            out[name].description = m["description"]
        if m.get("ucd"):
            out[name].meta["ucd"] = m["ucd"]
    return out


class Archive:
    """An open archive: query and write the catalog store."""

    def __init__(self, store: CatalogStore, location: str) -> None:
        self.store = store
        self.location = location

    @classmethod
    def open(cls, target: str | os.PathLike | None = None, create: bool = False, **kwargs) -> Archive:
        """Open (or with ``create=True`` initialise) the archive at a directory or Postgres URL
        (``target``; default ``$ARCHIVE_REPO``)."""
        location = resolve_repo(target)
        if not create:
            _check_exists(target, location)
        from archive.catalog.backends import open_store

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
        return astropy_table(df, self.column_meta(df.columns, table)) if as_table else df

    # -- what the columns mean (no store needed) -------------------------------------
    @staticmethod
    def column_meta(columns, table: str | None = None) -> dict[str, dict]:
        """``{"unit", "ucd", "description"}`` of result columns: a schema table's own (``table``),
        else what every schema table agrees on for that name, else the columns Archive
        derives (``distance_arcsec``, light-curve ``mag`` ...)."""
        from archive.catalog.schema import load_schema

        meta = load_schema().column_meta(columns, table)
        for c in columns:
            if c not in meta and c in DERIVED_COLUMNS:
                meta[c] = dict(DERIVED_COLUMNS[c])
        return meta

    @staticmethod
    def for_export(df: pd.DataFrame, table: str | None = None, names: str = "archive",
                   ) -> tuple[pd.DataFrame, dict[str, dict]]:
        """``df`` with Rubin or ZTF column names (``names``: archive, rubin or ztf; see
        docs/column_mapping.md) and the unit, UCD and description of each column."""
        from archive.catalog import colnames
        from archive.catalog.schema import load_schema

        meta = Archive.column_meta(df.columns, table)
        if names == "archive":
            return df, meta
        return colnames.rename(df, names, table, load_schema().bands, meta)

    @staticmethod
    def describe_table(table: str) -> pd.DataFrame:
        """One table's columns: name, type, unit, ucd, nullable, description."""
        t = Archive.schema_table(table)  # a wrong name fails before pandas loads
        import pandas as pd

        return pd.DataFrame([{"name": c.name, "type": c.type, "unit": c.unit or "", "ucd": c.ucd or "",
                              "nullable": c.nullable, "description": c.description} for c in t.columns])

    @staticmethod
    def schema_table(table: str):
        """The schema's :class:`archive.catalog.schema.Table` ``table`` (NotFoundError naming
        the tables when there is none)."""
        from archive.catalog.schema import load_schema

        try:
            return load_schema()[table]
        except KeyError as exc:
            raise NotFoundError(str(exc.args[0])) from None

    @staticmethod
    def schema_markdown() -> str:
        """The whole schema as Markdown (docs/schema.md)."""
        from archive.catalog.schema import markdown_docs

        return markdown_docs()

    @staticmethod
    def column_mapping_markdown() -> str:
        """Our column names beside Rubin's and ZTF's, as Markdown (docs/column_mapping.md)."""
        from archive.catalog.colnames import markdown

        return markdown()

    @staticmethod
    def flag_bits() -> pd.DataFrame:
        """Every bit of source.flags, dia_source.flags and exposure.quality_flags: column, bit,
        value, name, meaning (see docs/flags.md)."""
        import pandas as pd

        from archive.flags import bits

        df = pd.DataFrame(bits())
        df.insert(2, "value", [1 << int(b) for b in df["bit"]])
        return df

    @staticmethod
    def decode_flags(value: int, column: str | None = None) -> pd.DataFrame:
        """The bits set in ``value`` (of ``column``, default each flag column): column, bit, name, meaning."""
        import pandas as pd

        from archive.flags import COLUMNS, decode

        if column is not None and column not in COLUMNS:
            raise ArchiveError(f"no flag column {column!r}; the flag columns are {', '.join(COLUMNS)}")
        rows = decode(value, COLUMNS if column is None else (column,))
        return pd.DataFrame(rows, columns=["column", "bit", "name", "meaning"])

    @staticmethod
    def flags_markdown() -> str:
        """The flag reference as Markdown (docs/flags.md)."""
        from archive.flags import markdown

        return markdown()

    # -- database maintenance (PostgreSQL) ----------------------------------------------
    @staticmethod
    def _postgres_url(target, what: str) -> str:
        from archive.catalog.backends import is_postgres_url
        from archive.catalog.postgres_store import normalize_url

        url = resolve_repo(target)
        if not is_postgres_url(url):
            raise ArchiveError(f"`archive db {what}` needs a PostgreSQL URL; {url!r} is a directory store")
        return normalize_url(url)

    @staticmethod
    def _connecting(fn, url: str):
        import sqlalchemy as sa

        try:
            return fn()
        except sa.exc.OperationalError as exc:
            raise ArchiveError(f"cannot connect to {sa.engine.make_url(url).render_as_string(True)}: "
                               f"{str(exc.orig).strip().splitlines()[0]}") from None

    @staticmethod
    def upgrade(target=None, revision: str = "head") -> tuple[str | None, str]:
        """Bring a PostgreSQL archive to an Alembic ``revision``; returns (before, after)."""
        from archive.catalog.migrate import current_revision, upgrade

        url = Archive._postgres_url(target, "upgrade")
        before = Archive._connecting(lambda: current_revision(url), url)
        after = Archive._connecting(lambda: upgrade(url, revision), url)
        return before, after

    @staticmethod
    def grant_read_only(role: str, target=None) -> list[str]:
        """Create or check a login ``role`` that can only SELECT the archive's tables; returns
        what was done, one line each."""
        from archive.catalog.migrate import grant_read_only

        url = Archive._postgres_url(target, "grant-read-only")
        return Archive._connecting(lambda: grant_read_only(url, role), url)

    def compact(self, tables: Sequence[str] | None = None) -> dict[str, int]:
        """Parquet archive: merge each partition's files into one; returns files merged away per table."""
        if self.backend != "parquet":
            raise ArchiveError("compact applies to a Parquet archive (Postgres manages its own storage)")
        return self.store.compact(list(tables) if tables else None)

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
            as_of: float | None = None, require_all: bool = False):
        """Rows whose id (first primary-key column) is in ``ids`` (current versions for dia_object).

        ``require_all``: raise :class:`~archive.errors.NotFoundError` naming the ids that have
        no row (else they are simply absent from the result)."""
        t = self.store.table(table)
        ids = [ids] if isinstance(ids, (int, str)) else list(ids)
        need = None if columns is None else list(dict.fromkeys([t.id_column, *columns]))
        df = self._versions(table, need, lambda c, cur: self.store.get(table, ids, c), as_of)
        if require_all:
            have = set(df[t.id_column].tolist())
            missing = [i for i in dict.fromkeys(ids) if i not in have]
            if missing:
                when = "" if as_of is None else f" at MJD {as_of:g}"
                raise NotFoundError(f"no {table} with id {', '.join(map(str, missing[:10]))}"
                                    + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else "") + when)
        if columns is not None:
            df = df[list(columns)]
        return self._out(df, as_table, table)

    def history(self, dia_object_id: int) -> pd.DataFrame:
        """Every stored version of one DIAObject, oldest first (NotFoundError when there is none)."""
        df = self.store.get("dia_object", [int(dia_object_id)])
        if df.empty:
            raise NotFoundError(f"no dia_object with id {int(dia_object_id)}")
        return df.sort_values("validity_start").reset_index(drop=True)

    def object(self, dia_object_id: int, as_of: float | None = None, history: bool = False,
               observed_before: float | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """One DIAObject, as one row (or every version with ``history``).

        ``as_of`` (MJD TAI): the version the archive *held* at that time, i.e. as it had
        been written by then (``validity_start`` <= as_of < ``validity_end``): what a user
        querying then saw.  It is about when rows were written, not when the sky was
        observed.  ``observed_before`` (MJD TAI): the summaries recomputed from the
        object's DIASources (and forced photometry) observed before that time
        (``mjd`` < observed_before), with today's association; ``n_dia_sources``,
        fluxes and position are those of the earlier detections.
        A missing id raises :class:`~archive.errors.NotFoundError`, as in :meth:`light_curve`."""
        oid = int(dia_object_id)
        chosen = [n for n, v in (("history", history), ("as_of", as_of is not None),
                                 ("observed_before", observed_before is not None)) if v]
        if len(chosen) > 1:
            raise ArchiveError(f"choose one of history, as_of and observed_before (got {', '.join(chosen)})")
        if columns is not None:
            self.store._columns(self.store.table("dia_object"), columns)
        if history:
            df = self.history(oid)
        elif observed_before is not None:
            df = self._object_observed_before(oid, float(observed_before))
        else:
            df = self.get("dia_object", [oid], as_of=as_of)
            if df.empty:
                if as_of is None:
                    raise NotFoundError(f"no dia_object with id {oid}")
                first = float(self.history(oid)["validity_start"].min())
                raise NotFoundError(f"dia_object {oid} had no version at MJD {as_of:g} (written first at MJD "
                                    f"{first:.6f}; --as-of is the time rows were written, not observed)")
        return df if columns is None else df[list(columns)]

    def _object_observed_before(self, oid: int, mjd: float) -> pd.DataFrame:
        from archive.catalog.summaries import recompute

        current = self.get("dia_object", [oid])
        if current.empty:
            raise NotFoundError(f"no dia_object with id {oid}")
        q = "SELECT * FROM {t} WHERE dia_object_id = {oid} AND mjd < {mjd!r}"
        src = self.store.sql(q.format(t="dia_source", oid=oid, mjd=mjd))
        if src.empty:
            first = self.store.sql(f"SELECT min(mjd) AS m FROM dia_source WHERE dia_object_id = {oid}")["m"].iloc[0]
            raise NotFoundError(f"dia_object {oid} has no detection observed before MJD {mjd:g} "
                                f"(first detection at MJD {float(first):.6f})")
        forced = self.store.sql(q.format(t="dia_forced_source", oid=oid, mjd=mjd))
        df = recompute(src, forced, validity_start=float(current["validity_start"].iloc[0]))
        return df[current.columns]

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

    def light_curve(self, dia_object_id: int, bands: Sequence[str] | None = None,
                    observed_before: float | None = None) -> pd.DataFrame:
        """Detections and forced photometry of one DIAObject in one table, by time.

        Columns: ``mjd`` (TAI), ``band``, ``flux``, ``flux_err`` (nJy, difference
        image PSF flux), ``science_flux``, ``science_flux_err`` (nJy, direct image),
        ``mag``, ``mag_err`` (AB magnitude of ``flux`` where it is at least 5 sigma),
        ``mag_limit`` (the 5-sigma upper limit, AB, where it is not), ``kind``
        ("detection" | "forced"), ``exposure_id``, ``source_id``.
        ``observed_before`` (MJD TAI): only rows with ``mjd`` < that.
        A missing id raises :class:`~archive.errors.NotFoundError`, as in :meth:`object`.
        """
        import numpy as np
        import pandas as pd

        oid = int(dia_object_id)
        if self.get("dia_object", [oid], columns=["dia_object_id"]).empty:
            raise NotFoundError(f"no dia_object with id {oid}")
        before = "" if observed_before is None else f" AND mjd < {float(observed_before)!r}"
        q = ("SELECT mjd, band, psf_flux AS flux, psf_flux_err AS flux_err, science_flux, science_flux_err, "
             "'{kind}' AS kind, exposure_id, {idcol} AS source_id FROM {table} WHERE dia_object_id = {oid}"
             + before)
        det = self.store.sql(q.format(kind="detection", idcol="dia_source_id", table="dia_source", oid=oid))
        frc = self.store.sql(q.format(kind="forced", idcol="dia_forced_source_id", table="dia_forced_source", oid=oid))
        df = pd.concat([d for d in (det, frc) if len(d)], ignore_index=True) if (len(det) or len(frc)) else det
        if bands:
            df = df[df["band"].isin(list(bands))]
        df = df.sort_values(["mjd", "kind"], kind="stable").reset_index(drop=True)
        flux = pd.to_numeric(df["flux"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        err = pd.to_numeric(df["flux_err"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            bright = (flux > 0) & (err > 0) & (flux >= LIMIT_SNR * err)
            mag = np.where(bright, AB_NJY_ZP - 2.5 * np.log10(flux), np.nan)
            mag_err = np.where(bright, 2.5 / np.log(10.0) * err / flux, np.nan)
            limit = np.where(~bright & (err > 0), AB_NJY_ZP - 2.5 * np.log10(LIMIT_SNR * err), np.nan)
        pos = list(df.columns).index("science_flux_err") + 1
        for name, values in (("mag", mag), ("mag_err", mag_err), ("mag_limit", limit))[::-1]:
            df.insert(pos, name, values)
        # the template's flux at the object's position (dia_template step; primary copy, per band):
        # template_flux + flux puts the difference fluxes on an absolute scale
        tpl = self.store.sql("SELECT band, psf_flux, psf_flux_err FROM dia_template_source WHERE dia_object_id = "
                             f"{oid} AND dia_source_id IS NULL AND is_primary ORDER BY tile_id")
        tpl = tpl.drop_duplicates("band").set_index("band")
        t_flux = df["band"].map(tpl["psf_flux"]).to_numpy(np.float64, na_value=np.nan)
        t_err = df["band"].map(tpl["psf_flux_err"]).to_numpy(np.float64, na_value=np.nan)
        df["template_flux"], df["template_flux_err"] = t_flux, t_err
        df["total_flux"] = t_flux + flux
        df["total_flux_err"] = np.hypot(t_err, err)
        return df

    def list_light_curve(self, list_object_id: int, list_id=None, bands: Sequence[str] | None = None,
                         observed_before: float | None = None, images: Sequence[str] | None = None) -> pd.DataFrame:
        """Forced photometry of one position of a user's list (``archive forced --list``), by time.

        ``list_id``: the list's id or name (needed when several lists hold that id).  Columns:
        ``mjd``, ``band``, ``image`` (calexp | diff), ``flux``, ``flux_err`` (nJy), ``mag``,
        ``mag_err``, ``mag_limit`` (as :meth:`light_curve`), ``flags``, ``moved``, ``ra``, ``dec``,
        ``exposure_id``, ``list_id``.  No row for that id raises :class:`NotFoundError`."""
        import numpy as np

        oid = int(list_object_id)
        where = f"f.list_object_id = {oid}"
        if list_id is not None:
            lists = self.store.sql("SELECT list_id, name FROM forced_list")
            text = str(list_id)
            hit = lists[(lists["list_id"].astype(str) == text) | (lists["name"] == text)]
            if hit.empty:
                raise NotFoundError(f"no forced list {text!r} (lists: "
                                    f"{', '.join(f'{n} ({i})' for i, n in zip(lists['list_id'], lists['name'])) or 'none'})")
            where += " AND f.list_id IN (" + ", ".join(str(int(i)) for i in hit["list_id"]) + ")"
        if observed_before is not None:
            where += f" AND f.mjd < {float(observed_before)!r}"
        df = self.store.sql("SELECT f.mjd, f.band, f.image, f.psf_flux AS flux, f.psf_flux_err AS flux_err, f.flags, "
                            "f.moved, f.ra, f.dec, f.exposure_id, f.list_id FROM list_forced_source f "
                            f"WHERE {where} ORDER BY f.mjd, f.image")
        if df.empty:
            raise NotFoundError(f"no forced-list photometry for id {oid}"
                                + (f" in list {list_id}" if list_id is not None else ""))
        if df["list_id"].nunique() > 1 and list_id is None:
            raise ArchiveError(f"id {oid} is in several lists ({', '.join(map(str, sorted(df['list_id'].unique())))}):"
                               " name one with --list")
        if bands:
            df = df[df["band"].isin(list(bands))]
        if images:
            df = df[df["image"].isin(list(images))]
        df = df.reset_index(drop=True)
        flux = df["flux"].to_numpy(np.float64, na_value=np.nan)
        err = df["flux_err"].to_numpy(np.float64, na_value=np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            bright = (flux > 0) & (err > 0) & (flux >= LIMIT_SNR * err)
            df.insert(5, "mag", np.where(bright, AB_NJY_ZP - 2.5 * np.log10(flux), np.nan))
            df.insert(6, "mag_err", np.where(bright, 2.5 / np.log(10.0) * err / flux, np.nan))
            df.insert(7, "mag_limit", np.where(~bright & (err > 0), AB_NJY_ZP - 2.5 * np.log10(LIMIT_SNR * err), np.nan))
        return df

    def forced_list(self, path, images: str = "calexp", recenter: bool = False, name: str | None = None,
                    id_column: str | None = None, config: dict | None = None, products=None, jobs: int = 1,
                    progress: bool | None = None):
        """Register a user's list of positions (Parquet, CSV or FITS: ra, dec, an integer id) and
        measure it on every processed calexp (``images``: calexp, diff or both) now; later
        ``archive run`` measures it on new epochs.  A bad list is refused whole (one line naming
        the rows) and nothing is written; the same list again adds nothing.  Returns
        (list_id, new, :class:`~archive.pipeline.runner.StepReport`)."""
        from archive.pipeline.forced_lists import register_list

        list_id, new = register_list(self.store, path, self.products_root(products), images=images,
                                     recenter=recenter, name=name, id_column=id_column)
        runner = self.runner(config, products, jobs, progress=progress)
        runner.steps = [s for s in runner.steps if s.name == "forced_list"]
        try:
            report = runner.run()["forced_list"]
        finally:
            runner.executor.close()
        return list_id, new, report

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

    def read_files(self, table: str, paths: Sequence[str | os.PathLike], progress=None):
        """Read catalog files (Parquet, CSV, FITS) for ``table``, each validated against the
        schema on its own (errors name the file, column and rows), as one Arrow table.
        ``progress``: called as ``progress(done, total, path)`` after each file."""
        import pyarrow as pa

        from archive.catalog.tablefile import read_table_file
        from archive.catalog.validate import conform

        if not paths:
            raise ArchiveError("no files given")
        t = self.store.table(table)
        arrows = []
        for i, p in enumerate(paths):
            arrows.append(conform(t, read_table_file(p), where=os.fspath(p)))
            if progress is not None:
                progress(i + 1, len(paths), os.fspath(p))
        return pa.concat_tables(arrows) if len(arrows) > 1 else arrows[0]

    def ingest_files(self, table: str, paths: Sequence[str | os.PathLike], progress=None) -> int:
        """Read catalog files (Parquet, CSV, FITS) and write them as ONE atomic batch.

        Every file is read and validated before anything is written; an error
        names the file, column and rows, and leaves the archive untouched.
        ``progress``: as in :meth:`read_files`.
        """
        return self.store.write(table, self.read_files(table, paths, progress),
                                where=", ".join(map(os.fspath, paths)))

    # -- matched sources (direct-image sources across epochs) --------------------
    def ingest_sources(self, data, radius_arcsec: float = 1.0, replace: bool = False, where: str | None = None):
        """Match per-epoch ``source`` rows into ``matched_source`` objects and store both atomically.

        ``where``: names the input in error messages (e.g. the files read)."""
        from archive.catalog.matched_ingest import ingest_sources

        return ingest_sources(self.store, data, radius_arcsec=radius_arcsec, replace=replace, where=where)

    def relative_photometry(self, region, band: str, **fit_options):
        """Per-epoch zero-point offsets from the region's constant stars, and corrected light curves."""
        from archive.catalog.matched_ingest import relative_photometry

        return relative_photometry(self.store, region, band, **fit_options)

    def rms_curve(self, region, band: str, relative: bool = True, min_epochs: int = 3, plot=None) -> pd.DataFrame:
        """The rms-versus-magnitude diagnostic of a field (optionally drawn to ``plot``)."""
        from archive.catalog.matched_ingest import rms_curve

        return rms_curve(self.store, region, band, relative=relative, min_epochs=min_epochs, plot=plot)

    def epoch_matrix(self, region, band: str, property: str = "psf_flux", relative: bool = False,
                     path=None) -> pd.DataFrame:
        """Epochs x matched sources matrix of a source column (NaN where unseen); written to
        ``path`` (.parquet or .h5) when given."""
        from archive.catalog.matched_ingest import field_epoch_matrix

        if path is not None:
            return self.export_epoch_matrix(region, band, property, path, relative=relative)[1]
        return field_epoch_matrix(self.store, region, band, property, relative=relative)

    def export_epoch_matrix(self, region, band: str, property: str, path, relative: bool = False):
        """Write :meth:`epoch_matrix` to ``path`` (.parquet, .h5 or .hdf5); returns (path written, matrix)."""
        from archive.catalog.matched_ingest import export_epoch_matrix

        return export_epoch_matrix(self.store, region, band, property, path, relative=relative)

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
        import pandas as pd

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

    @staticmethod
    def read_run_config(path) -> dict:
        """A run configuration file (YAML or JSON: step name -> settings), checked."""
        from archive.pipeline.chain import load_run_config

        return load_run_config(path)

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

    def status(self, config: dict | None = None, products=None, units: bool = False,
               step: str | None = None) -> pd.DataFrame:
        """Per step: units registered, done, pending, stale and failed (with the reasons);
        ``units=True``: one row per unit (e.g. per tile and band), of ``step`` or of all."""
        runner = self.runner(config, products)
        return runner.unit_status(step) if units else runner.status()

    # -- image products and cutouts (read-only; see archive.pipeline.images) -------------
    def image_product(self, kind: str, visit=None, detector=None, tile=None, band: str | None = None):
        """The ``image_product`` row of one product: ``kind`` and visit (+ detector) for calexp,
        diff, score; tile for coadd, template; both for warp.  NotFoundError names what exists."""
        from archive.pipeline.images import find_image

        return find_image(self.store, kind, visit, detector, tile, band)

    def image(self, kind: str, visit=None, detector=None, tile=None, band: str | None = None, products=None):
        """One stored image product as an :class:`~archive.image.exposure.Exposure` (checksum verified)."""
        from archive.pipeline.products import ProductStore

        row = self.image_product(kind, visit, detector, tile, band)
        return ProductStore(self.products_root(products)).read(row, verify=True)

    def save_image(self, kind: str, path, visit=None, detector=None, tile=None, band: str | None = None,
                   products=None, overwrite: bool = False):
        """Copy one stored product's FITS file to ``path`` (a file, or a directory for its own name)
        as it is stored; returns the path written."""
        from archive.pipeline.images import copy_image
        from archive.pipeline.products import ProductStore

        row = self.image_product(kind, visit, detector, tile, band)
        return copy_image(ProductStore(self.products_root(products)), row, path, overwrite)

    def cutouts(self, ra=None, dec=None, size="10arcsec", kind: str | None = None, visit=None, detector=None,
                tile=None, band: str | None = None, dia_source_id=None, products=None) -> list:
        """Stamps (:class:`archive.image.cutout.Cutout`) around (``ra``, ``dec``) in degrees.

        ``size``: arcsec (a number), or a string such as ``"64px"``, ``"1.5arcmin"``.  ``kind``:
        calexp or diff (of ``visit``, else of every exposure covering the position, in time
        order), template (with ``visit``: on that exposure's grid), coadd, or all (science,
        template and difference of one exposure on one grid; the default with
        ``dia_source_id``, which also gives the position, exposure and band)."""
        from archive.pipeline.images import cutouts
        from archive.pipeline.products import ProductStore

        return cutouts(self.store, ProductStore(self.products_root(products), self.store), ra, dec, size, kind,
                       visit, detector, tile, band, dia_source_id)

    def cutout(self, ra, dec, size="10arcsec", kind: str = "calexp", visit=None, detector=None, tile=None,
               band: str | None = None, products=None):
        """One stamp (a :class:`archive.image.cutout.Cutout`); an error when the request matches
        several (e.g. many exposures cover the position: give the visit)."""
        if kind == "all":
            raise ArchiveError("kind 'all' gives three stamps: use Archive.cutouts()")
        got = self.cutouts(ra, dec, size, kind, visit, detector, tile, band, products=products)
        if len(got) > 1:
            from archive.pipeline.images import stamp_name

            raise ArchiveError(f"{len(got)} {kind} stamps cover the position "
                               f"({', '.join(stamp_name(c) for c in got[:5])}{', ...' if len(got) > 5 else ''}): "
                               "give the visit (or tile)")
        return got[0]

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
