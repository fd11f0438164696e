"""The embedded store: a directory of HEALPix-partitioned Parquet, one HATS catalog per table.

Layout (``K`` = the store's partition order)::

    ROOT/archive-store.json            store marker (format, schema version, K)
    ROOT/manifest.json                 the committed state: every live file of every table
    ROOT/.lock                         writer lock (fcntl), holds the writer's PID
    ROOT/_txn/                         journals of in-flight transactions (crash recovery)
    ROOT/<table>/hats.properties       HATS catalog properties
    ROOT/<table>/partition_info.csv    HATS partition list (Norder, Npix)
    ROOT/<table>/dataset/_common_metadata
    ROOT/<table>/dataset/Norder=K/Dir=D/Npix=N/part-<gen>-<uid>.parquet

Non-positional tables keep their files in ``ROOT/<table>/dataset/`` directly.

Atomicity: the manifest is the truth.  A transaction writes new files under
hidden temporary names, renames them into place, then replaces
``manifest.json`` with ``os.replace`` (the commit point).  Readers read the
manifest once and only open files it lists, so they see the old state or the
new one, never half.  A writer killed before the commit leaves files that no
manifest lists; its journal in ``_txn/`` names them and the next writer
deletes them.  A second concurrent writer finds the fcntl lock held and gets
:class:`~archive.errors.StoreLockedError` naming the holder's PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from archive.catalog.schema import Schema, Table
from archive.catalog.sqlguard import check_read_only
from archive.catalog.store import CatalogStore, Transaction, frame_from_arrow
from archive.errors import ArchiveError, NotFoundError, ReadOnlyError, StoreLockedError, ValidationError
from archive.sky.healpix import partition_pixel
from archive.sky.regions import ranges_contain

log = logging.getLogger(__name__)

FORMAT = "archive-parquet-store"
FORMAT_VERSION = 1
DEFAULT_ORDER = 5
#: Rows per Parquet row group; files are sorted by healpix29, so with small
#: groups the row-group statistics let a small cone decode one group, not the file.
ROW_GROUP_ROWS = 4_096


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetStore(CatalogStore):
    """HEALPix-partitioned Parquet store with DuckDB as its SQL engine."""

    backend = "parquet"

    def __init__(self, root, create: bool = False, order: int = DEFAULT_ORDER,
                 schema: Schema | None = None) -> None:
        super().__init__(schema)
        self.root = pathlib.Path(root).expanduser().absolute()
        marker = self.root / "archive-store.json"
        if create:
            self._create(order)
        elif not marker.exists():
            if not self.root.exists():
                raise NotFoundError(f"no archive at {self.root} (run `archive init {self.root}` first)")
            raise NotFoundError(f"{self.root} is not an archive store (no archive-store.json)")
        info = json.loads(marker.read_text())
        if info.get("format") != FORMAT:
            raise ArchiveError(f"{marker}: not an archive Parquet store")
        if info.get("schema_version") != self.schema.version:
            raise ArchiveError(f"{self.root}: store has schema version {info.get('schema_version')}, "
                               f"this code expects {self.schema.version}")
        self.order = int(info["partition_order"])
        self._manifest_cache: tuple | None = None
        self._duck_dir: tempfile.TemporaryDirectory | None = None
        self._duck_generation: int | None = None

    # -- creation ------------------------------------------------------------
    def _create(self, order: int) -> None:
        if not 0 <= order <= 12:
            raise ArchiveError(f"partition order must be within 0..12, got {order}")
        if (self.root / "archive-store.json").exists():
            raise ArchiveError(f"an archive already exists at {self.root}")
        if self.root.exists() and any(self.root.iterdir()):
            raise ArchiveError(f"{self.root} exists and is not empty; choose a new directory")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "_txn").mkdir(exist_ok=True)
        manifest = {"format": FORMAT, "generation": 0,
                    "tables": {t.name: {"files": {}} for t in self.schema}}
        for t in self.schema:
            self._write_hats_metadata(t, manifest["tables"][t.name]["files"])
        _atomic_write(self.root / "manifest.json", json.dumps(manifest, indent=1).encode())
        info = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "schema_version": self.schema.version, "partition_order": order}
        _atomic_write(self.root / "archive-store.json", json.dumps(info, indent=1).encode())

    # -- manifest ------------------------------------------------------------
    def manifest(self) -> dict:
        """The committed state.

        Parsed once per committed version: a commit replaces manifest.json with
        ``os.replace``, so (inode, mtime, size) identifies the version and the
        parsed copy is reused until it changes.  Callers must not modify it.
        """
        path = self.root / "manifest.json"
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._manifest_cache is not None and self._manifest_cache[0] == key:
                return self._manifest_cache[1]
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: manifest.json is missing; not a usable store") from None
        self._manifest_cache = (key, manifest)
        return manifest

    def _files(self, manifest: dict, table: str, partitions: Iterable[int] | None = None) -> list[pathlib.Path]:
        files = manifest["tables"][table]["files"]
        base = self.root / table / "dataset"
        if partitions is None:
            return [base / rel for rel in files]
        wanted = set(int(p) for p in partitions)
        return [base / rel for rel, meta in files.items() if meta.get("npix") in wanted]

    # -- reading -------------------------------------------------------------
    def _read(self, table: Table, files: list[pathlib.Path], columns: list[str],
              filters=None) -> pa.Table:
        if not files:
            return table.arrow_schema.empty_table().select(columns)
        parts = [pq.read_table(f, columns=columns, filters=filters, schema=table.arrow_schema)
                 for f in files]
        return pa.concat_tables(parts)

    def _retrying(self, fn):
        """Run a read; if a file vanished under us (a concurrent commit replaced
        it), re-read the manifest and try again: readers always see a committed state."""
        for attempt in range(5):
            try:
                return fn(self.manifest())
            except FileNotFoundError:
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _region_arrow(self, manifest: dict, t: Table, region, columns: list[str],
                      current_only: bool = False) -> pa.Table:
        ranges = region.pixel_ranges(region.default_order())
        shift = 2 * (29 - self.order)
        parts = np.unique(np.concatenate(
            [np.arange(lo >> shift, ((hi - 1) >> shift) + 1) for lo, hi in ranges])) if len(ranges) else []
        files = self._files(manifest, t.name, parts)
        cols = list(dict.fromkeys(columns + ["ra", "dec", "healpix29"]))
        if not files:
            return t.arrow_schema.empty_table().select(columns)
        lo, hi = int(ranges[0, 0]), int(ranges[-1, 1])
        filt = (pc.field("healpix29") >= lo) & (pc.field("healpix29") < hi)
        if current_only:
            filt = filt & pc.field("validity_end").is_null()
        arrow = self._read(t, files, cols, filters=filt)
        h = arrow.column("healpix29").to_numpy()
        keep = ranges_contain(ranges, h)
        if keep.any():
            idx = np.flatnonzero(keep)
            ra = arrow.column("ra").to_numpy()[idx]
            dec = arrow.column("dec").to_numpy()[idx]
            idx = idx[region.contains(ra, dec)]
        else:
            idx = np.zeros(0, dtype=np.int64)
        return arrow.take(pa.array(idx, type=pa.int64())).select(columns)

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        t = self.table(table)
        if not t.positional:
            raise ArchiveError(f"table {table!r} has no positions")
        cols = self._columns(t, columns)
        return frame_from_arrow(self._retrying(lambda m: self._region_arrow(m, t, region, cols, current_only)))

    def get(self, table: str, ids: Sequence, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        key = t.id_column
        values = pa.array(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids),
                          type=t.column(key).arrow_type)

        def run(manifest):
            files = self._files(manifest, table)
            parts = []
            for f in files:
                keys = pq.read_table(f, columns=[key]).column(key)
                mask = pc.is_in(keys, value_set=values)
                if pc.any(mask).as_py():
                    full = pq.read_table(f, columns=list(dict.fromkeys(cols + [key])), schema=t.arrow_schema)
                    parts.append(full.filter(mask))
            if not parts:
                return t.arrow_schema.empty_table().select(cols)
            return pa.concat_tables(parts).select(cols)

        return frame_from_arrow(self._retrying(run))

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """All rows of a table (use SQL or region queries for large tables)."""
        t = self.table(table)
        cols = self._columns(t, columns)
        return frame_from_arrow(self._retrying(lambda m: self._read(t, self._files(m, table), cols)))

    def count(self, table: str) -> int:
        self.table(table)
        return sum(meta["rows"] for meta in self.manifest()["tables"][table]["files"].values())

    # -- SQL (DuckDB, read-only) --------------------------------------------
    def _duck_database(self, manifest: dict) -> str:
        """A DuckDB file whose views name the manifest's files, rebuilt when the
        store changes; it is then opened read-only for user queries."""
        gen = manifest["generation"]
        if self._duck_dir is None:
            self._duck_dir = tempfile.TemporaryDirectory(prefix="archive-duckdb-")
        path = os.path.join(self._duck_dir.name, f"views-{gen}.duckdb")
        if self._duck_generation != gen or not os.path.exists(path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            con = duckdb.connect(path)
            try:
                for t in self.schema:
                    files = [str(f) for f in self._files(manifest, t.name)]
                    if files:
                        con.execute(f'CREATE VIEW "{t.name}" AS SELECT * FROM read_parquet('
                                    f"{files!r}, union_by_name=false, hive_partitioning=false)")
                    else:
                        empty = t.arrow_schema.empty_table()
                        con.register("_empty", empty)
                        con.execute(f'CREATE TABLE "{t.name}" AS SELECT * FROM _empty')
                        con.unregister("_empty")
            finally:
                con.close()
            self._duck_generation = gen
        return path

    def sql(self, query: str) -> pd.DataFrame:
        check_read_only(query)

        def run(manifest):
            con = duckdb.connect(self._duck_database(manifest), read_only=True)
            try:
                return con.sql(query).to_arrow_table()
            except duckdb.Error as exc:
                msg = str(exc).splitlines()[0]
                if "read-only" in msg.lower() or "read only" in msg.lower():
                    raise ReadOnlyError(f"archive SQL is read-only: {msg}") from None
                if isinstance(exc, duckdb.IOException) and "No files found" in msg:
                    raise FileNotFoundError(msg) from None
                raise ArchiveError(f"SQL error: {msg}") from None
            finally:
                con.close()

        return frame_from_arrow(self._retrying(run))

    def close(self) -> None:
        if self._duck_dir is not None:
            self._duck_dir.cleanup()
            self._duck_dir = None

    # -- writing -------------------------------------------------------------
    def transaction(self) -> ParquetTransaction:
        return ParquetTransaction(self)

    def _write_hats_metadata(self, t: Table, files: dict) -> None:
        """HATS properties, partition list and schema file for one table."""
        tdir = self.root / t.name
        (tdir / "dataset").mkdir(parents=True, exist_ok=True)
        rows = sum(m["rows"] for m in files.values())
        props = [f"obs_collection={t.name}",
                 f"dataproduct_type={'object' if t.name in ('dia_object', 'matched_source') else 'source'}",
                 f"hats_nrows={rows}", "hats_npix_suffix=/", "hats_version=v1.0",
                 "hats_builder=time-domain-archive"]
        if t.positional:
            props += ["hats_col_ra=ra", "hats_col_dec=dec", "hats_col_healpix=healpix29",
                      "hats_col_healpix_order=29"]
            pixels = sorted({(m["norder"], m["npix"]) for m in files.values()})
            csv = "Norder,Npix\n" + "".join(f"{o},{p}\n" for o, p in pixels)
            _atomic_write(tdir / "partition_info.csv", csv.encode())
        _atomic_write(tdir / "hats.properties", ("\n".join(props) + "\n").encode())
        sink = pa.BufferOutputStream()
        pq.write_metadata(t.arrow_schema, sink)
        _atomic_write(tdir / "dataset" / "_common_metadata", sink.getvalue().to_pybytes())

    def compact(self, tables: Sequence[str] | None = None, min_files: int = 2) -> dict[str, int]:
        """Merge each partition's files into one sorted file (one atomic transaction).

        Batches add a file per partition they touch; compaction keeps reads to
        one file per partition.  Returns the number of files removed per table.
        """
        removed: dict[str, int] = {}
        with self.transaction() as tx:
            for name in tables or [t.name for t in self.schema]:
                t = self.table(name)
                groups: dict = {}
                for rel, meta in tx._live(name).items():
                    groups.setdefault(meta.get("npix"), []).append(rel)
                base = self.root / name / "dataset"
                n = 0
                for npix, rels in groups.items():
                    if len(rels) < min_files:
                        continue
                    rows = pa.concat_tables([pq.read_table(base / r, schema=t.arrow_schema) for r in rels])
                    tx._drop += [(name, r) for r in rels]
                    tx.append(name, rows, check_keys=False)
                    n += len(rels) - 1
                removed[name] = n
        return removed

    def recover(self) -> int:
        """Delete files left by writers that died before committing; returns how many.

        Called by every transaction after it takes the lock."""
        txn_dir = self.root / "_txn"
        txn_dir.mkdir(exist_ok=True)
        manifest = self.manifest()
        live = {(name, rel) for name, t in manifest["tables"].items() for rel in t["files"]}
        removed = 0
        for journal in sorted(txn_dir.glob("*.json")):
            try:
                entry = json.loads(journal.read_text())
            except (OSError, ValueError):
                entry = {"new": []}
            for table, rel in entry.get("new", []):
                if (table, rel) in live:
                    continue
                path = self.root / table / "dataset" / rel
                for p in (path, path.with_name(f".{path.name}.tmp")):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed += 1
            for table, rel in entry.get("drop", []):
                if (table, rel) not in live:  # committed drop whose unlink did not happen
                    with contextlib.suppress(FileNotFoundError):
                        (self.root / table / "dataset" / rel).unlink()
            journal.unlink()
        for tmp in txn_dir.glob(".*.tmp"):
            tmp.unlink()
        if removed:
            log.warning("%s: removed %d file(s) left by an interrupted write", self.root, removed)
        return removed


class ParquetTransaction(Transaction):
    """Holds the store's write lock from creation until commit or rollback."""

    def __init__(self, store: ParquetStore) -> None:
        self.store = store
        self._lock_fh = self._acquire_lock()
        try:
            store.recover()
            self.base = store.manifest()
        except BaseException:
            self._release()
            raise
        self.txid = f"{self.base['generation'] + 1:012d}-{uuid.uuid4().hex[:8]}"
        self._new: list[tuple[str, str, dict]] = []     # (table, rel, meta)
        self._drop: list[tuple[str, str]] = []          # (table, rel)
        self._done = False

    def _acquire_lock(self):
        path = self.store.root / ".lock"
        fh = open(path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise StoreLockedError(f"archive {self.store.root} is locked by {holder}; "
                                   "another writer is active, try again when it finishes") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"PID {os.getpid()} (since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})")
        fh.flush()
        return fh

    def _release(self) -> None:
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                self._lock_fh.seek(0)
                self._lock_fh.truncate()
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _journal(self) -> None:
        entry = {"new": [[t, rel] for t, rel, _ in self._new], "drop": [list(d) for d in self._drop]}
        _atomic_write(self.store.root / "_txn" / f"{self.txid}.json", json.dumps(entry).encode())

    def _live(self, table: str) -> dict:
        """Files of ``table`` as this transaction will leave them (base - drops + news)."""
        files = {rel: meta for rel, meta in self.base["tables"][table]["files"].items()
                 if (table, rel) not in set(self._drop)}
        files.update({rel: meta for t, rel, meta in self._new if t == table})
        return files

    def _check_new_keys(self, t: Table, rows: pa.Table) -> None:
        """Refuse keys that already exist (the Parquet twin of a primary-key constraint)."""
        key = t.id_column
        files = [self.store.root / t.name / "dataset" / rel for rel in self._live(t.name)]
        if not files:
            return
        ids = rows.column(key)
        con = duckdb.connect()
        try:
            con.register("batch_ids", pa.table({"k": ids}))
            keycols = ", ".join(f'"{k}"' for k in t.primary_key)
            if len(t.primary_key) == 1:
                q = (f'SELECT "{key}" FROM read_parquet({[str(f) for f in files]!r}, hive_partitioning=false) '
                     f'WHERE "{key}" IN (SELECT k FROM batch_ids) LIMIT 5')
            else:
                con.register("batch", rows.select(list(t.primary_key)))
                q = (f"SELECT {keycols} FROM read_parquet({[str(f) for f in files]!r}, hive_partitioning=false) "
                     f"INTERSECT SELECT {keycols} FROM batch LIMIT 5")
            clash = con.execute(q).fetchall()
        finally:
            con.close()
        if clash:
            raise ValidationError(f"table {t.name!r}: {len(clash)}+ row(s) already stored with the same "
                                  f"key ({', '.join(t.primary_key)}), e.g. {clash[0]}; nothing written")

    def append(self, table: str, rows: pa.Table, check_keys: bool = True) -> None:
        """Append rows; ``check_keys=False`` skips the stored-key scan for rows whose
        keys are new by construction (rewritten rows, fresh object versions)."""
        if self._done:
            raise ArchiveError("transaction already finished")
        t = self.store.table(table)
        if rows.schema != t.arrow_schema:
            rows = rows.cast(t.arrow_schema)
        if check_keys:
            self._check_new_keys(t, rows)
        base = self.store.root / table / "dataset"
        gen = self.base["generation"] + 1
        if t.positional:
            rows = rows.sort_by("healpix29")
            part = partition_pixel(rows.column("healpix29").to_numpy(), self.store.order)
            bounds = np.flatnonzero(np.diff(part)) + 1
            starts = np.concatenate([[0], bounds])
            ends = np.concatenate([bounds, [len(part)]])
            groups = [(int(part[s]), s, e) for s, e in zip(starts, ends)]
        else:
            groups = [(None, 0, rows.num_rows)]
        planned = []
        for npix, s, e in groups:
            name = f"part-{gen:08d}-{uuid.uuid4().hex[:12]}.parquet"
            if npix is None:
                rel = name
            else:
                rel = f"Norder={self.store.order}/Dir={npix // 10000 * 10000}/Npix={npix}/{name}"
            planned.append((rel, npix, s, e))
            self._new.append((table, rel, {"rows": int(e - s), "npix": npix,
                                           "norder": self.store.order if npix is not None else None}))
        self._journal()  # before any file exists, so a crash can be cleaned up
        for rel, _npix, s, e in planned:
            path = base / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(rows.slice(s, e - s), tmp, row_group_size=ROW_GROUP_ROWS,
                           compression="zstd", write_statistics=True)
            os.replace(tmp, path)

    def delete(self, table: str, column: str, values: Sequence,
               partitions: Iterable[int] | None = None) -> int:
        """Rewrite the files holding matching rows without them (copy-on-write)."""
        t = self.store.table(table)
        t.column(column)
        value_set = pa.array(np.asarray(values), type=t.column(column).arrow_type)
        if len(value_set) == 0:
            return 0
        wanted = None if partitions is None else {int(p) for p in partitions}
        deleted = 0
        base = self.store.root / table / "dataset"
        for rel, meta in list(self._live(table).items()):
            if wanted is not None and meta.get("npix") not in wanted:
                continue
            path = base / rel
            hit = pc.is_in(pq.read_table(path, columns=[column]).column(column), value_set=value_set)
            n = pc.sum(hit).as_py() or 0
            if not n:
                continue
            keep = pq.read_table(path, schema=t.arrow_schema).filter(pc.invert(hit))
            deleted += n
            if any(r == rel for tt, r, _ in self._new if tt == table):
                # a file this transaction wrote: rewrite it in place (not yet visible)
                self._new = [(tt, r, m) for tt, r, m in self._new if not (tt == table and r == rel)]
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                self._drop.append((table, rel))
            if keep.num_rows:
                self.append(table, keep, check_keys=False)
        self._journal()
        return deleted

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        t = self.store.table(table)
        cols = self.store._columns(t, columns)
        view = {"generation": self.base["generation"],
                "tables": {table: {"files": self._live(table)}}}
        return frame_from_arrow(self.store._region_arrow(view, t, region, cols, current_only))

    def select_in(self, table: str, column: str, values: Sequence,
                  partitions: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.store.table(table)
        t.column(column)
        cols = self.store._columns(t, columns)
        value_set = pa.array(np.asarray(values), type=t.column(column).arrow_type)
        wanted = None if partitions is None else {int(p) for p in partitions}
        base = self.store.root / table / "dataset"
        parts = []
        for rel, meta in self._live(table).items():
            if wanted is not None and meta.get("npix") not in wanted:
                continue
            hit = pc.is_in(pq.read_table(base / rel, columns=[column]).column(column), value_set=value_set)
            if pc.any(hit).as_py():
                parts.append(pq.read_table(base / rel, columns=cols, schema=t.arrow_schema).filter(hit))
        return frame_from_arrow(pa.concat_tables(parts) if parts else t.arrow_schema.empty_table().select(cols))

    def close_versions(self, table: str, ids: Sequence, end: float,
                       partitions: Iterable[int] | None = None) -> int:
        """Copy-on-write: rewrite the files holding these ids with validity_end set."""
        t = self.store.table(table)
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0:
            return 0
        rows = self.select_in(table, t.id_column, ids, partitions)
        open_rows = rows["validity_end"].isna().to_numpy()
        if not open_rows.any():
            return 0
        rows.loc[open_rows, "validity_end"] = float(end)
        self.delete(table, t.id_column, ids, partitions)
        self.append(table, pa.Table.from_pandas(rows, schema=t.arrow_schema, preserve_index=False),
                    check_keys=False)
        return int(open_rows.sum())

    def commit(self) -> None:
        if self._done:
            return
        try:
            if self._new or self._drop:
                manifest = json.loads(json.dumps(self.base))
                manifest["generation"] = self.base["generation"] + 1
                touched = {t for t, _, _ in self._new} | {t for t, _ in self._drop}
                for name in touched:
                    manifest["tables"][name]["files"] = self._live(name)
                for name in touched:
                    self.store._write_hats_metadata(self.store.table(name), manifest["tables"][name]["files"])
                _atomic_write(self.store.root / "manifest.json", json.dumps(manifest, indent=1).encode())
                _fsync_dir(self.store.root)  # the commit point is durable
                self._remove(self._drop)
            self._remove_journal()
        finally:
            self._done = True
            self._release()

    def rollback(self) -> None:
        if self._done:
            return
        try:
            self._remove((table, rel) for table, rel, _ in self._new)
            self._remove_journal()
        finally:
            self._done = True
            self._release()

    def _remove(self, files) -> None:
        for table, rel in files:
            with contextlib.suppress(FileNotFoundError):
                (self.store.root / table / "dataset" / rel).unlink()

    def _remove_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.store.root / "_txn" / f"{self.txid}.json").unlink()

    def __del__(self):  # a transaction dropped without commit releases its lock
        if getattr(self, "_lock_fh", None) is not None and not self._done:
            with contextlib.suppress(Exception):
                self.rollback()

