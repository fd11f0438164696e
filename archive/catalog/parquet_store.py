"""The embedded store: a directory of HEALPix-partitioned Parquet, one HATS catalog per table.

Layout (``K`` = the store's partition order, ``T`` = the margin threshold)::

    ROOT/archive-store.json            store marker (format, schema version, K, T)
    ROOT/manifest.json                 the committed state: every live file of every table
    ROOT/.lock                         writer lock (fcntl), holds the writer's PID
    ROOT/_txn/                         journals (and staged files) of in-flight transactions
    ROOT/_retired/                     files the last commits took out, kept for readers
    ROOT/_manifests/                   the last committed manifests (archive recover)
    ROOT/<table>/hats.properties       HATS catalog properties (positional tables only)
    ROOT/<table>/partition_info.csv    HATS partition list (Norder, Npix)
    ROOT/<table>/point_map.fits        rows per partition (also skymap.fits)
    ROOT/<table>/dataset/_common_metadata, _metadata
    ROOT/<table>/dataset/Norder=K/Dir=D/Npix=N/part-<gen>-<uid>.parquet
    ROOT/collections/<table>/collection.properties      the table + its margin, for LSDB
    ROOT/collections/<table>/<table>_<T>arcs/           its HATS margin catalog

Non-positional tables keep their files in ``ROOT/<table>/dataset/`` directly and
carry no HATS properties (a plain Parquet dataset).  A manifest entry per file
holds ``rows``, ``npix``/``norder``, ``bytes``, ``id`` (min/max of the table's id
column, so the key check and id look-ups skip files that cannot hold an id) and,
for positional tables, ``margin``: the partitions whose margin catalog got rows of
this file, with their counts (entries of older stores lack the last ones).

What a reader of the folders sees: the dataset folders hold exactly the files of
the committed manifest, so LSDB, hats, DuckDB's ``read_parquet('.../dataset/**')``
or any Parquet reader count what the archive counts.  HATS metadata
(:mod:`archive.catalog.hats`) is rewritten by each commit for the tables it
changed; ``_metadata`` only while a table is small enough (see
``HATS_METADATA_MAX_CHUNKS``; above it a commit removes it and :meth:`compact`
or :meth:`ParquetStore.write_hats_metadata` writes it), so it is current or
absent, never stale.  Margin catalogs are kept current by every commit: each
data file's margin rows are written beside it (one small file per neighbouring
partition that gets rows) and leave with it.

Reading: files are immutable once committed, so their parsed footers are cached
(:class:`_FooterCache`).  A region query opens only the files of the touched
partitions, decodes only the row groups whose healpix29 statistics meet the
covering's ranges, and those first for healpix29/ra/dec only; the other columns
are decoded for the row groups that hold rows passing the exact test.

Atomicity: the manifest is the truth.  A transaction writes its new files (and
their margin files) into its own staging folder ``_txn/<txid>/``, outside every
dataset folder.  At commit it journals what it publishes, then, partition by
partition, renames the files it drops into ``_retired/`` (same relative path)
and its new files into place, rewrites the HATS metadata, and replaces
``manifest.json`` with ``os.replace`` (the commit point).  The folders thus
switch in a burst of renames (milliseconds) right at the commit; no reader sees
uncommitted files, and replaced ones leave the dataset folders with it.  The
store's readers read the manifest once and open only the files it lists; a file
a commit has since moved aside is found in ``_retired/`` (or, once unlinked, the
read retries on the new manifest, ``_retrying``).  Retired files are unlinked by
the first commit ``RETAIN_SECONDS`` later.  A writer killed before publishing
leaves only its staging folder, which the next writer deletes; one killed while
publishing leaves a journal, from which the next writer puts every named file
where the committed manifest says (back into place, or aside, or away).  A
second concurrent writer finds the fcntl lock held and gets
:class:`~archive.errors.StoreLockedError` naming the holder's PID.

Compaction: every batch adds a file per partition it touches, and a region
query opens every file of its partitions.  So each commit (unless
``auto_compact`` is off) merges files in the partitions the transaction
wrote, size-tiered like an LSM tree: a file's tier is ``floor(log_F(rows /
COMPACT_BASE_ROWS))`` (F = ``compact_fanout``, tier 0 below ``F *
COMPACT_BASE_ROWS`` rows), and a tier that holds F files is merged into one
sorted file, which lands a tier higher (and may cascade).  A partition then
holds fewer than F files per tier, and a row is rewritten about once per tier
it climbs, so write amplification grows with ``log_F`` of the partition size.
The merge is part of the transaction: its output is a new file, its inputs are
dropped, all at the same manifest commit.  :meth:`ParquetStore.compact`
still merges whole partitions into one file on demand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from archive.catalog import hats as hatslayout
from archive.catalog.schema import Schema, Table
from archive.catalog.sqlguard import check_duckdb_query
from archive.catalog.sqlnames import postgres_names
from archive.catalog.store import CatalogStore, Transaction, frame_from_arrow
from archive.errors import ArchiveError, NotFoundError, ReadOnlyError, StoreLockedError, ValidationError
from archive.sky.healpix import partition_pixel
from archive.sky.regions import ranges_contain

log = logging.getLogger(__name__)

FORMAT = "archive-parquet-store"
FORMAT_VERSION = 1
DEFAULT_ORDER = 5
#: Rows per Parquet row group.  Files are sorted by healpix29, so a cone's
#: candidates sit in one or a few groups that the footer's min/max statistics
#: name; smaller groups mean less to decode per cone, at the price of a larger
#: footer (parsed once per file and cached, see :class:`_FooterCache`).
ROW_GROUP_ROWS = 2_048
#: LZ4 (raw) decodes about twice as fast as zstd and cone latency is decode-bound;
#: measured at 1M rows: one 2,048-row group of dia_source, all columns, 0.7 ms
#: (LZ4) vs 1.5 ms (zstd), files ~15 % larger.
COMPRESSION = "lz4"
#: Parsed footers kept per store (LRU); one entry is a few KB to ~100 KB.
FOOTER_CACHE_FILES = 4_096
#: healpix29 values kept in memory per store (LRU by file, 8 bytes each: 128 MB). With a
#: file's sorted healpix29 in memory a cone finds its rows by binary search and decodes
#: nothing in files (or row groups) where it has none, which is most of them for small cones.
HEALPIX_INDEX_ROWS = 16_000_000
#: Threads writing a batch's partition files (pyarrow releases the GIL).
WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Automatic compaction (see the module docstring): a partition tier holding this
#: many files is merged into one.  4 keeps a partition at <= 3 files per tier
#: (cone latency grows with the files opened) with about log_4(rows / base) rewrites
#: per row.  Measured (bench_cone, 2M dense rows in 20 batches of 100k, 45
#: partitions): 111 files instead of 900, 2" cones 3.1 ms instead of 8.5 ms
#: (one file per partition: 2.0 ms), loading 9 s instead of 3-6 s.
COMPACT_FANOUT = 4
#: Rows below which files are not told apart by size: every file under
#: ``COMPACT_FANOUT * COMPACT_BASE_ROWS`` rows is in tier 0, so the many tiny files
#: of per-visit ingests merge together in a few cheap steps instead of climbing
#: tiers of 1, 4, 16... rows one by one.
COMPACT_BASE_ROWS = 2_048
#: Largest file an automatic merge writes (rows): a merge holds its rows in memory
#: (~250 B a row for dia_source) and runs inside an ingest's commit, so a tier
#: whose merge would exceed this is left as it is (``compact()`` still merges it).
COMPACT_MAX_ROWS = 2_000_000
#: Seconds a file stays on disk after a commit took it out of the store (listed
#: under ``retired`` in the manifest, unlinked by the first commit after that):
#: a reader that read the previous manifest is still reading its files, and with
#: merges at commit nearly every commit drops some.  Readers that outlive this
#: window re-read the manifest and retry (``_retrying``).
RETAIN_SECONDS = 60.0
#: ``dataset/_metadata`` (the footer of every row group of every file) is rewritten by
#: each commit only while the table holds at most this many column chunks (row groups
#: x columns; ~100-200 bytes each in the file): its cost grows with the whole table,
#: not with what the commit wrote.  Above it a commit removes the file (never leaves it
#: stale) and :meth:`ParquetStore.compact` / :meth:`ParquetStore.write_hats_metadata`
#: write it.  20,000 chunks: a 2-4 MB file, ~10-30 ms.
HATS_METADATA_MAX_CHUNKS = 20_000
#: A transaction that writes more data files than this (a bulk load over a wide area:
#: 1M rows over the whole sky make 12,288 files of ~80 rows) leaves the margin rows of
#: the files past this count to :meth:`ParquetStore.compact` /
#: :meth:`ParquetStore.write_hats_margins`: margin files roughly double such a write's
#: file count and its time, while a visit's few files pay a few per cent.  Until then
#: the table's margin catalog is incomplete and not offered (never wrong).
MARGIN_MAX_FILES = 256
#: On-disk layout version, kept in the manifest (``layout``).  2: a commit moves the
#: files it drops to ``_retired/``, transactions stage their files outside the dataset
#: folders, commits keep HATS metadata and margin catalogs.  A store of layout 1 is
#: brought to 2 by its next transaction.
LAYOUT = 2


def compaction_tier(rows: int, fanout: int = COMPACT_FANOUT, base: int | None = None) -> int:
    """Size tier of a file of ``rows`` rows: 0 below ``fanout * base`` (default
    ``COMPACT_BASE_ROWS``), then +1 per factor ``fanout``."""
    tier, x = 0, int(rows) // (COMPACT_BASE_ROWS if base is None else base)
    while x >= fanout:
        x //= fanout
        tier += 1
    return tier


def plan_merges(files: Sequence[tuple[str, int]], fanout: int = COMPACT_FANOUT,
                base: int | None = None, max_rows: int | None = None) -> list[list[str]]:
    """Which of one partition's files (name, rows) to merge, as groups (one output file each).

    Repeatedly merges the lowest tier that holds ``fanout`` or more files (real
    or already-planned outputs); an output that completes a higher tier is
    folded into that tier's merge, so a cascade costs one rewrite, not several.
    Afterwards every tier holds fewer than ``fanout`` files, except tiers whose
    merge would write more than ``max_rows`` rows (left alone)."""
    units: list[tuple[int, list[str]]] = [(int(rows), [name]) for name, rows in files]
    too_big: set[int] = set()
    while True:
        tiers: dict[int, list[int]] = {}
        for i, (rows, _) in enumerate(units):
            tiers.setdefault(compaction_tier(rows, fanout, base), []).append(i)
        full = [tier for tier, members in tiers.items() if len(members) >= fanout and tier not in too_big]
        if not full:
            break
        members = set(tiers[min(full)])
        if max_rows is not None and sum(units[i][0] for i in members) > max_rows:
            too_big.add(min(full))  # outputs land in higher tiers only, so it stays as it is
            continue
        merged = (sum(units[i][0] for i in members), [n for i in sorted(members) for n in units[i][1]])
        units = [u for i, u in enumerate(units) if i not in members] + [merged]
    return [names for _, names in units if len(names) > 1]


def _writer_options(schema: pa.Schema) -> dict:
    """pq.write_table options.  Dictionary encoding only for string columns: on
    measurement floats (all distinct) it costs write time, size and decode time."""
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return {"row_group_size": ROW_GROUP_ROWS, "compression": COMPRESSION,
            "use_dictionary": strings, "write_statistics": True}


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


def _retired_of(path) -> str:
    """Where the data file ``<root>/<table>/dataset/<rel>`` lies once a commit took it
    out of the store: ``<root>/_retired/<table>/dataset/<rel>``."""
    head, _, rel = str(path).rpartition("/dataset/")
    root, _, table = head.rpartition("/")
    return f"{root}/_retired/{table}/dataset/{rel}"


def _parquet_file(path, metadata=None) -> pq.ParquetFile:
    """Open a committed data file, in its dataset folder or, when a later commit has
    moved it aside for readers of older manifests, in ``_retired/``.  FileNotFoundError
    when it is gone from both (retention over): the caller's read retries."""
    try:
        return pq.ParquetFile(path, metadata=metadata)
    except FileNotFoundError:
        return pq.ParquetFile(_retired_of(path), metadata=metadata)


def _read_metadata(path) -> pq.FileMetaData:
    try:
        return pq.read_metadata(path)
    except FileNotFoundError:
        return pq.read_metadata(_retired_of(path))


def _unlink(path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _prune_empty_dirs(path: str, stop: str) -> None:
    """Remove ``path`` and its parents up to (not including) ``stop`` while they are empty:
    a partition that lost its last file leaves no ``Npix=`` folder (HATS readers list them)."""
    path, stop = str(path).rstrip("/"), str(stop).rstrip("/")
    while path.startswith(stop + "/"):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): parents are not empty either
            return
        path = os.path.dirname(path)


class _FileInfo:
    """What one committed file's footer says, parsed once: files never change
    after they are renamed into place (names are unique per transaction)."""

    __slots__ = ("metadata", "group_rows", "schema_ok", "_column_index", "_bounds", "_nulls")

    def __init__(self, metadata: pq.FileMetaData, schema: pa.Schema) -> None:
        self.metadata = metadata
        self.group_rows = np.array([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
                                   dtype=np.int64)
        # files written by this store carry the table's schema; anything else is cast on read
        self.schema_ok = metadata.schema.to_arrow_schema().equals(schema, check_metadata=False)
        self._column_index = {name: j for j, name in enumerate(metadata.schema.names)}
        self._bounds: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
        self._nulls: dict[str, np.ndarray | None] = {}

    @property
    def n_groups(self) -> int:
        return len(self.group_rows)

    def _stats(self, column: str) -> list | None:
        j = self._column_index.get(column)
        if j is None:
            return None
        return [self.metadata.row_group(i).column(j).statistics for i in range(self.n_groups)]

    def bounds(self, column: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-row-group (min, max) of ``column``, or None when a group has no statistics."""
        if column not in self._bounds:
            stats = self._stats(column)
            if stats is None or not all(s is not None and s.has_min_max for s in stats):
                self._bounds[column] = None
            else:
                self._bounds[column] = (np.array([s.min for s in stats]), np.array([s.max for s in stats]))
        return self._bounds[column]

    def null_counts(self, column: str) -> np.ndarray | None:
        """Per-row-group null count of ``column``, or None when unknown."""
        if column not in self._nulls:
            stats = self._stats(column)
            ok = stats is not None and all(s is not None and s.has_null_count for s in stats)
            self._nulls[column] = np.array([s.null_count for s in stats], dtype=np.int64) if ok else None
        return self._nulls[column]


class _FooterCache:
    """LRU of parsed footers, keyed by path and the file's manifest entry (rows,
    bytes): a committed file is immutable, so an entry never goes stale; files
    that left the manifest simply age out."""

    def __init__(self, max_files: int = FOOTER_CACHE_FILES) -> None:
        self.max_files = max_files
        self._entries: OrderedDict[tuple, _FileInfo] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def get(self, path: pathlib.Path, meta: dict, schema: pa.Schema, keep: bool = True) -> _FileInfo:
        """The file's parsed footer; ``keep=False``: do not add it to the cache on a
        miss (files read once before they leave the store, e.g. merge inputs)."""
        key = (str(path), meta.get("rows"), meta.get("bytes"))
        with self._lock:
            info = self._entries.get(key)
            if info is not None:
                self._entries.move_to_end(key)
                return info
        metadata = _read_metadata(path)  # FileNotFoundError once a commit unlinked it: callers retry
        if meta.get("rows") is not None and metadata.num_rows != meta["rows"]:
            raise ArchiveError(f"{path}: holds {metadata.num_rows} rows but manifest.json says {meta['rows']}; "
                               "the store is damaged")
        info = _FileInfo(metadata, schema)
        with self._lock:
            self.misses += 1
            if not keep:
                return info
            self._entries[key] = info
            while len(self._entries) > self.max_files:
                self._entries.popitem(last=False)
        return info

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class _HealpixIndex:
    """LRU of the ``healpix29`` column of recently queried files (immutable once committed),
    bounded by the number of values held. A file whose column is not sorted (not written by
    this store) is remembered as such and read the ordinary way."""

    def __init__(self, max_rows: int = HEALPIX_INDEX_ROWS) -> None:
        self.max_rows = int(max_rows)
        self._entries: OrderedDict[tuple, np.ndarray | None] = OrderedDict()
        self._rows = 0
        self._lock = threading.Lock()

    def get(self, path: pathlib.Path, meta: dict, info: _FileInfo) -> np.ndarray | None:
        """Sorted healpix29 of the file, or None (unsorted, or larger than the whole budget)."""
        key = (str(path), meta.get("rows"), meta.get("bytes"))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        if info.metadata.num_rows > self.max_rows:
            return None
        with _parquet_file(path, metadata=info.metadata) as pf:
            hp = pf.read(columns=["healpix29"], use_threads=False).column("healpix29").to_numpy()
        if hp.size > 1 and not bool(np.all(hp[1:] >= hp[:-1])):
            hp = None
        with self._lock:
            if key not in self._entries:
                self._entries[key] = hp
                self._rows += 0 if hp is None else hp.size
                while self._rows > self.max_rows and len(self._entries) > 1:
                    _, old = self._entries.popitem(last=False)
                    self._rows -= 0 if old is None else old.size
        return hp

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._rows = 0


def _rows_in_ranges(hp: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Positions of the sorted ``hp`` values inside the sorted, disjoint half-open ``ranges``."""
    a = np.searchsorted(hp, ranges[:, 0], side="left")
    b = np.searchsorted(hp, ranges[:, 1], side="left")
    n = b - a
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    # concatenated aranges a[i] .. b[i]-1 without a Python loop
    starts = np.repeat(a - np.concatenate([[0], np.cumsum(n)[:-1]]), n)
    return starts + np.arange(total, dtype=np.int64)


def _groups_overlapping_ranges(info: _FileInfo, ranges: np.ndarray) -> np.ndarray:
    """Row groups whose healpix29 [min, max] meets one of the sorted half-open ``ranges``."""
    b = info.bounds("healpix29")
    if b is None:
        return np.arange(info.n_groups)
    lo, hi = b
    # the first range ending after a group's min overlaps it iff it starts at or before its max
    j = np.searchsorted(ranges[:, 1], lo, side="right")
    ok = j < len(ranges)
    ok[ok] = ranges[j[ok], 0] <= hi[ok]
    return np.flatnonzero(ok)


def _sorted_values(values: pa.Array) -> np.ndarray | None:
    """Sorted values of a numeric, null-free value set (None: cannot prune by statistics).
    Duplicates are harmless to the searches below (np.unique's hashing is slower than a sort)."""
    if values.null_count or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        return None
    v = np.sort(values.to_numpy(zero_copy_only=False))
    return v[~np.isnan(v)] if v.dtype.kind == "f" else v


def _any_value_within(v: np.ndarray, lo, hi) -> np.ndarray:
    """Which intervals [lo, hi] (arrays) hold at least one of the sorted values ``v``."""
    lo, hi = np.asarray(lo), np.asarray(hi)
    if v.size == 0:
        return np.zeros(lo.shape, dtype=bool)
    j = np.searchsorted(v, lo, side="left")
    ok = j < v.size
    ok[ok] = v[j[ok]] <= hi[ok]
    return ok


def _groups_holding(info: _FileInfo, column: str, v: np.ndarray | None) -> np.ndarray:
    """Row groups whose ``column`` statistics admit one of the sorted values ``v`` (all if unknown)."""
    b = info.bounds(column) if v is not None else None
    if b is None:
        return np.arange(info.n_groups)
    return np.flatnonzero(_any_value_within(v, *b))


def _read_groups(pf: pq.ParquetFile, info: _FileInfo, groups: np.ndarray, columns: list[str],
                 schema: pa.Schema) -> pa.Table:
    """Columns of some row groups, with the table's types."""
    if len(groups) == info.n_groups:
        tab = pf.read(columns=columns, use_threads=False)
    else:
        tab = pf.read_row_groups([int(g) for g in groups], columns=columns, use_threads=False)
    if not info.schema_ok:
        tab = tab.select(columns).cast(pa.schema([schema.field(c) for c in columns]))
    return tab


def _take_from_groups(pf: pq.ParquetFile, info: _FileInfo, groups: np.ndarray, idx: np.ndarray,
                      columns: list[str], schema: pa.Schema) -> pa.Table:
    """Rows ``idx`` (positions in the concatenation of ``groups``) of ``columns``,
    decoding only the groups that hold them."""
    starts = np.concatenate([[0], np.cumsum(info.group_rows[groups])])
    g = np.searchsorted(starts, idx, side="right") - 1  # position of each row's group in ``groups``
    need = np.unique(g)
    if need.size == groups.size:
        return _read_groups(pf, info, groups, columns, schema).take(pa.array(idx, type=pa.int64()))
    sub_starts = np.concatenate([[0], np.cumsum(info.group_rows[groups[need]])])
    local = idx - starts[g] + sub_starts[np.searchsorted(need, g)]
    return _read_groups(pf, info, groups[need], columns, schema).take(pa.array(local, type=pa.int64()))


def _write_file(path, rows: pa.Table) -> tuple[int, pq.FileMetaData]:
    """Write one file (in a transaction's staging folder, which no reader lists: no
    temporary name needed); returns its size and footer."""
    collected: list = []
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(rows, path, metadata_collector=collected, **_writer_options(rows.schema))
    return os.stat(path).st_size, collected[0]


#: Committed manifests kept in ROOT/_manifests/ for :meth:`ParquetStore.recover_manifest`.
MANIFEST_BACKUPS = 3


def _sql_string(text: str) -> str:
    """``text`` as a DuckDB string literal."""
    return "'" + str(text).replace("'", "''") + "'"


class ParquetStore(CatalogStore):
    """HEALPix-partitioned Parquet store with DuckDB as its SQL engine."""

    backend = "parquet"

    def __init__(self, root, create: bool = False, order: int = DEFAULT_ORDER,
                 schema: Schema | None = None, auto_compact: bool = True,
                 compact_fanout: int = COMPACT_FANOUT, compact_max_rows: int | None = COMPACT_MAX_ROWS,
                 retain_seconds: float = RETAIN_SECONDS,
                 margin_arcsec: float = hatslayout.MARGIN_ARCSEC) -> None:
        """``auto_compact``: transactions merge same-tier files of the partitions they
        wrote at commit (default; see the module docstring); ``compact_fanout``: files
        per tier that trigger a merge (also the tiers' size factor), at least 2;
        ``compact_max_rows``: largest file an automatic merge writes (None: no limit);
        ``retain_seconds``: how long dropped files stay for readers of older
        manifests (0: unlinked at the commit that drops them); ``margin_arcsec``
        (with ``create``): the HATS margin catalogs' threshold, kept in the store."""
        super().__init__(schema)
        if int(compact_fanout) < 2:
            raise ArchiveError(f"compact_fanout must be at least 2, got {compact_fanout}")
        self.auto_compact = bool(auto_compact)
        self.compact_fanout = int(compact_fanout)
        self.compact_max_rows = compact_max_rows
        self.retain_seconds = float(retain_seconds)
        self.root = pathlib.Path(root).expanduser().absolute()
        self._root = str(self.root)
        self._manifest_cache: tuple | None = None
        self._index_cache: tuple[dict, dict] | None = None  # (manifest, {table: {npix: [(path, meta)]}})
        self._schemas: dict[str, pa.Schema] = {}
        self._footers = _FooterCache()
        self._healpix = _HealpixIndex()
        self._duck_dir: tempfile.TemporaryDirectory | None = None
        self._duck_generation: int | None = None
        #: footers of files (file_path set) for ``_metadata``: (kind, table, rel) -> FileMetaData
        self._file_md: dict[tuple[str, str, str], pq.FileMetaData] = {}
        marker = self.root / "archive-store.json"
        if create:
            self._create(order, margin_arcsec)
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
        self._set_order(int(info["partition_order"]), float(info.get("margin_arcsec", hatslayout.MARGIN_ARCSEC)))

    def _set_order(self, order: int, margin_arcsec: float) -> None:
        self.order = order
        #: margin catalogs: threshold (arcsec), HEALPix order of the margin test, name
        self.margin_arcsec = margin_arcsec
        self.margin_order = hatslayout.margin_order(margin_arcsec)
        if self.margin_order <= order:
            raise ArchiveError(f"margin threshold {margin_arcsec:g} arcsec is too wide for partition order "
                               f"{order}: HATS margins need pixels finer than the partitions")

    # -- creation ------------------------------------------------------------
    def _create(self, order: int, margin_arcsec: float) -> None:
        if not 0 <= order <= 12:
            raise ArchiveError(f"partition order must be within 0..12, got {order}")
        if (self.root / "archive-store.json").exists():
            raise ArchiveError(f"an archive already exists at {self.root}")
        if self.root.exists() and any(self.root.iterdir()):
            raise ArchiveError(f"{self.root} exists and is not empty; choose a new directory")
        self._set_order(order, float(margin_arcsec))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "_txn").mkdir(exist_ok=True)
        manifest = {"format": FORMAT, "generation": 0, "layout": LAYOUT,
                    "tables": {t.name: {"files": {}} for t in self.schema}}
        for t in self.schema:
            self._write_hats_metadata(t, manifest["tables"][t.name]["files"])
        self._write_manifest(manifest)
        info = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "schema_version": self.schema.version, "partition_order": order,
                "margin_arcsec": float(margin_arcsec)}
        _atomic_write(self.root / "archive-store.json", json.dumps(info, indent=1).encode())

    # -- paths ---------------------------------------------------------------
    def _dataset_dir(self, table: str) -> str:
        return f"{self._root}/{table}/dataset"

    def _data_path(self, table: str, rel: str) -> str:
        return f"{self._root}/{table}/dataset/{rel}"

    def _collection_dir(self, table: str) -> str:
        return f"{self._root}/{hatslayout.COLLECTIONS_DIR}/{table}"

    def _margin_dir(self, table: str) -> str:
        """The table's HATS margin catalog."""
        return f"{self._collection_dir(table)}/{hatslayout.margin_name(table, self.margin_arcsec)}"

    def _margin_rel(self, rel: str, npix: int) -> str:
        """Where the margin rows that data file ``rel`` gives partition ``npix`` go (relative
        to the margin catalog's dataset folder): the data file's name in that partition."""
        return f"Norder={self.order}/Dir={npix // 10000 * 10000}/Npix={npix}/{rel.rpartition('/')[2]}"

    def _retired(self, path: str) -> str:
        """Where ``path`` (under the root) lies while retired: the same path under ``_retired/``."""
        return f"{self._root}/_retired/{path[len(self._root) + 1:]}"

    def _staged(self, stage: str, table: str, rel: str, margin_npix: int | None = None) -> str:
        """Path of a file in a transaction's staging folder: the dataset's own layout
        below ``<stage>/<table>`` (``<stage>/<table>.margin`` for margin files), so a
        partition new to the table moves into place as one folder."""
        if margin_npix is not None:
            return f"{stage}/{table}.margin/{self._margin_rel(rel, margin_npix)}"
        return f"{stage}/{table}/{rel}"

    def _physical(self, table: str, rel: str, margins, stage: str | None = None) -> list[tuple[str, str | None]]:
        """(path in place, path in ``stage``) of a data file and of its margin files."""
        out = [(self._data_path(table, rel), self._staged(stage, table, rel) if stage else None)]
        mdir = self._margin_dir(table)
        for npix in margins:
            out.append((f"{mdir}/dataset/{self._margin_rel(rel, int(npix))}",
                        self._staged(stage, table, rel, int(npix)) if stage else None))
        return out

    def _prune_dirs(self, paths) -> None:
        """Remove the emptied partition folders of the given file paths (dataset, margin
        catalog or retired area)."""
        for d in sorted({os.path.dirname(p) for p in paths}, reverse=True):
            stop = d.rpartition("/dataset/")[0] + "/dataset" if "/dataset/" in d else self._root
            _prune_empty_dirs(d, stop)

    # -- manifest ------------------------------------------------------------
    def manifest(self) -> dict:
        """The committed state.

        Parsed once per committed version: a commit replaces manifest.json with
        ``os.replace``, so (inode, mtime, size) identifies the version and the
        parsed copy is reused until it changes.  Callers must not modify it.
        A manifest that does not parse (or lacks a table) raises an error
        that says how to recover (:meth:`recover_manifest`).
        """
        path = self.root / "manifest.json"
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._manifest_cache is not None and self._manifest_cache[0] == key:
                return self._manifest_cache[1]
            manifest = self._parse_manifest(path.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"{self.root}: manifest.json is missing; "
                                f"{self._recovery_hint()}") from None
        except ValueError as exc:
            raise ArchiveError(f"{path} is corrupt ({exc}); {self._recovery_hint()}") from None
        self._manifest_cache = (key, manifest)
        return manifest

    def _parse_manifest(self, data: bytes) -> dict:
        """The manifest in ``data``; ValueError when it is not one of this store's."""
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON: {str(exc).splitlines()[0][:80]}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("not an archive manifest")
        tables = manifest.get("tables")
        if isinstance(tables, dict):
            # a table the schema gained after this archive was written: empty until first written
            for t in self.schema:
                tables.setdefault(t.name, {"files": {}})
        missing = [t.name for t in self.schema if not isinstance(tables, dict) or t.name not in tables
                   or not isinstance(tables[t.name], dict) or not isinstance(tables[t.name].get("files"), dict)]
        if missing or not isinstance(manifest.get("generation"), int):
            raise ValueError(f"no valid entry for {', '.join(missing) or 'generation'}")
        return manifest

    def _recovery_hint(self) -> str:
        if any(self._backup_dir().glob("manifest-*.json")):
            return (f"run `archive recover --repo {self.root}` to restore the newest intact committed "
                    f"state from {self._backup_dir()}")
        return "restore it from a backup of the archive"

    def _backup_dir(self) -> pathlib.Path:
        return self.root / "_manifests"

    def _write_manifest(self, manifest: dict) -> None:
        """Commit ``manifest``: a numbered copy in ``_manifests/`` first (the last
        ``MANIFEST_BACKUPS`` are kept, for :meth:`recover_manifest`), then manifest.json."""
        data = json.dumps(manifest, indent=1).encode()
        backups = self._backup_dir()
        backups.mkdir(exist_ok=True)
        _atomic_write(backups / f"manifest-{manifest['generation']:012d}.json", data)
        _atomic_write(self.root / "manifest.json", data)
        for old in sorted(backups.glob("manifest-*.json"))[:-MANIFEST_BACKUPS]:
            with contextlib.suppress(OSError):
                old.unlink()

    def recover_manifest(self) -> int:
        """Restore manifest.json from the newest backup whose every file is present (in
        place or retired) with its row count; returns that generation.  The dataset
        folders and HATS metadata are made to match it.  Takes the writer lock."""
        lock = _lock_store(self.root)
        try:
            for path in sorted(self._backup_dir().glob("manifest-*.json"), reverse=True):
                try:
                    manifest = self._parse_manifest(path.read_bytes())
                    for name in manifest["tables"]:
                        for rel, meta in manifest["tables"][name]["files"].items():
                            f = self._data_path(name, rel)
                            if not os.path.exists(f):
                                f = self._retired(f)
                            if pq.ParquetFile(f).metadata.num_rows != meta["rows"]:
                                raise ValueError(f"{f}: row count differs")
                except (ValueError, OSError, pa.ArrowException) as exc:
                    log.warning("manifest backup %s unusable: %s", path.name, exc)
                    continue
                self._reconcile_all(manifest)
                manifest = {**manifest, "layout": LAYOUT}
                for t in self.schema:
                    self._write_hats_metadata(t, manifest["tables"][t.name]["files"])
                _atomic_write(self.root / "manifest.json", json.dumps(manifest, indent=1).encode())
                _fsync_dir(self.root)
                self._manifest_cache = None
                return int(manifest["generation"])
        finally:
            _unlock_store(lock)
        raise ArchiveError(f"{self.root}: no intact manifest backup in {self._backup_dir()}; "
                           "restore the archive from a backup")

    def _reconcile_all(self, manifest: dict) -> None:
        """Make every dataset folder (and margin catalog) hold exactly ``manifest``'s live
        files: listed files missing in place come back from ``_retired/``, files in place
        that it does not list go to ``_retired/`` (retired ones stay there until their
        retention ends; files no manifest lists stay there for the operator).  A full
        scan: for layout upgrades and :meth:`recover_manifest`, not for commits."""
        moved = 0
        for t in self.schema:
            files = manifest["tables"][t.name]["files"]
            expected = {self._data_path(t.name, rel) for rel in files}
            expected |= {p for rel, meta in files.items()
                         for p, _ in self._physical(t.name, rel, [m[0] for m in meta.get("margin", [])])[1:]}
            dirs = [self._dataset_dir(t.name), f"{self._margin_dir(t.name)}/dataset"]
            present = {str(p) for d in dirs for p in pathlib.Path(d).rglob("*.parquet")
                       if not p.name.startswith(".")}
            for p in sorted(present - expected):
                os.makedirs(os.path.dirname(self._retired(p)), exist_ok=True)
                os.replace(p, self._retired(p))
                moved += 1
            for p in sorted(expected - present):
                if os.path.exists(self._retired(p)):
                    os.makedirs(os.path.dirname(p), exist_ok=True)
                    os.replace(self._retired(p), p)
                    moved += 1
                else:
                    log.warning("%s: %s is listed but missing", self.root, p)
            self._prune_dirs(present - expected)
        if moved:
            log.warning("%s: moved %d file(s) to match manifest generation %d", self.root, moved,
                        manifest["generation"])

    def _files(self, manifest: dict, table: str, partitions: Iterable[int] | None = None) -> list[str]:
        """Paths of a table's live files for DuckDB, each where it lies now: in place, or
        (a commit since moved it aside) in ``_retired/``."""
        out = []
        for path, _ in self._entries(manifest, table, partitions):
            if not os.path.exists(path) and os.path.exists(_retired_of(path)):
                path = _retired_of(path)
            out.append(path)
        return out

    def _entries(self, manifest: dict, table: str,
                 partitions: Iterable[int] | None = None) -> list[tuple[str, dict]]:
        """(path, manifest entry) of a table's live files, optionally of some partitions only.
        Paths are plain strings: building 10^4 pathlib objects per call costs ~0.2 s.  A
        transaction's view names its own (staged) files' paths under ``paths``."""
        if partitions is None:
            base = self._dataset_dir(table)
            tab = manifest["tables"][table]
            paths = tab.get("paths")
            if paths:
                return [(paths.get(rel) or f"{base}/{rel}", meta) for rel, meta in tab["files"].items()]
            return [(f"{base}/{rel}", meta) for rel, meta in tab["files"].items()]
        index = self._partition_index(manifest, table)
        return [e for p in dict.fromkeys(int(p) for p in partitions) for e in index.get(p, ())]

    def _partition_index(self, manifest: dict, table: str) -> dict:
        """npix -> [(path, meta)] of a table; kept for the committed manifest (queries
        then skip a pass over every file), rebuilt for transaction views."""
        cached = self._index_cache
        committed = self._manifest_cache is not None and manifest is self._manifest_cache[1]
        if committed and cached is not None and cached[0] is manifest and table in cached[1]:
            return cached[1][table]
        index: dict = {}
        for path, meta in self._entries(manifest, table):
            index.setdefault(meta.get("npix"), []).append((path, meta))
        if committed:
            if cached is None or cached[0] is not manifest:
                self._index_cache = cached = (manifest, {})
            cached[1][table] = index
        return index

    def _schema(self, t: Table) -> pa.Schema:
        """The table's Arrow schema, built once (Table.arrow_schema builds it per call)."""
        s = self._schemas.get(t.name)
        if s is None:
            s = self._schemas[t.name] = t.arrow_schema
        return s

    def _empty(self, t: Table, columns: list[str]) -> pa.Table:
        schema = self._schema(t)
        return pa.schema([schema.field(c) for c in columns]).empty_table()

    # -- reading -------------------------------------------------------------
    def _read(self, table: Table, files: list, columns: list[str], filters=None) -> pa.Table:
        """All rows of ``files`` ((path, meta) pairs or paths).  ``filters`` is
        accepted for compatibility and applied with pq.read_table."""
        if not files:
            return self._empty(table, columns)
        schema = self._schema(table)
        parts = []
        for f in files:
            path, meta = f if isinstance(f, tuple) else (f, {})
            if filters is not None:
                try:
                    parts.append(pq.read_table(path, columns=columns, filters=filters, schema=schema))
                except FileNotFoundError:
                    parts.append(pq.read_table(_retired_of(path), columns=columns, filters=filters, schema=schema))
                continue
            info = self._footers.get(path, meta, schema)
            with _parquet_file(path, metadata=info.metadata) as pf:
                parts.append(_read_groups(pf, info, np.arange(info.n_groups), columns, schema))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _retrying(self, fn):
        """Run a read; if a file vanished under us (a concurrent commit moved it aside
        or, after the retention, unlinked it), re-read the manifest and try again:
        readers always see a committed state.  DuckDB names a moved file as one it may
        not access (its allowed paths are the files' places when the query began): that
        is retried too, with the SQL views rebuilt on the files' current places."""
        for attempt in range(5):
            try:
                return fn(self.manifest())
            except (FileNotFoundError, ReadOnlyError) as exc:
                moved = isinstance(exc, FileNotFoundError) or (
                    "Cannot access file" in str(exc) and f"{self._root}/" in str(exc))
                if attempt == 4 or not moved:
                    raise
                self._duck_generation = None  # views of files' former places: rebuild
                time.sleep(0.05 * (attempt + 1))

    def _region_partitions(self, ranges: np.ndarray) -> np.ndarray:
        """Order-K partition pixels that the order-29 ``ranges`` touch."""
        shift = 2 * (29 - self.order)
        return np.unique(np.concatenate([np.arange(lo >> shift, ((hi - 1) >> shift) + 1) for lo, hi in ranges]))

    def _region_arrow(self, manifest: dict, t: Table, region, columns: list[str],
                      current_only: bool = False) -> pa.Table:
        """Exact region query over the files of the touched partitions.

        Per file: the row groups whose healpix29 statistics meet the covering's
        ranges (not just its overall span) are probed for healpix29/ra/dec
        (and validity_end); the other columns are decoded only for the groups
        that hold rows passing the exact test."""
        schema = self._schema(t)
        ranges = np.asarray(region.pixel_ranges(region.default_order()), dtype=np.int64).reshape(-1, 2)
        if not len(ranges):
            return self._empty(t, columns)
        entries = self._entries(manifest, t.name, self._region_partitions(ranges))
        probe_cols = ["healpix29", "ra", "dec"] + (["validity_end"] if current_only else [])
        rest = [c for c in columns if c not in probe_cols]
        out_schema = pa.schema([schema.field(c) for c in columns])
        parts = []
        for path, meta in entries:
            info = self._footers.get(path, meta, schema)
            hp = self._healpix.get(path, meta, info)
            if hp is not None:
                part = self._region_rows_indexed(path, info, hp, ranges, region, columns, current_only, schema,
                                                 out_schema)
                if part is not None:
                    parts.append(part)
                continue
            groups = _groups_overlapping_ranges(info, ranges)
            if current_only and groups.size:
                nulls = info.null_counts("validity_end")
                if nulls is not None:  # groups without a null validity_end hold no current version
                    groups = groups[nulls[groups] > 0]
            if not groups.size:
                continue
            with _parquet_file(path, metadata=info.metadata) as pf:
                probe = _read_groups(pf, info, groups, probe_cols, schema)
                keep = ranges_contain(ranges, probe.column("healpix29").to_numpy())
                if current_only:
                    keep &= probe.column("validity_end").is_null().to_numpy(zero_copy_only=False)
                idx = np.flatnonzero(keep)
                if idx.size:
                    ra = probe.column("ra").to_numpy()[idx]
                    dec = probe.column("dec").to_numpy()[idx]
                    idx = idx[region.contains(ra, dec)]
                if not idx.size:
                    continue
                probe = probe.take(pa.array(idx, type=pa.int64()))
                other = _take_from_groups(pf, info, groups, idx, rest, schema) if rest else None
            parts.append(pa.Table.from_arrays(
                [probe.column(c) if c in probe_cols else other.column(c) for c in columns], schema=out_schema))
        if not parts:
            return out_schema.empty_table()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    @staticmethod
    def _region_rows_indexed(path, info: _FileInfo, hp: np.ndarray, ranges: np.ndarray, region,
                             columns: list[str], current_only: bool, schema: pa.Schema,
                             out_schema: pa.Schema) -> pa.Table | None:
        """One file's rows in ``region`` using its in-memory sorted healpix29: binary search
        for the covering's ranges, then ra/dec (and validity_end) only of those rows' row
        groups for the exact test, then the other columns only of the rows that pass."""
        idx = _rows_in_ranges(hp, ranges)
        if not idx.size:
            return None
        every = np.arange(info.n_groups)
        probe_cols = ["ra", "dec"] + (["validity_end"] if current_only else [])
        with _parquet_file(path, metadata=info.metadata) as pf:
            probe = _take_from_groups(pf, info, every, idx, probe_cols, schema)
            keep = region.contains(probe.column("ra").to_numpy(), probe.column("dec").to_numpy())
            if current_only:
                keep &= probe.column("validity_end").is_null().to_numpy(zero_copy_only=False)
            if not keep.any():
                return None
            sel = np.flatnonzero(keep)
            rows = idx[sel]
            probe = probe.take(pa.array(sel, type=pa.int64()))
            rest = [c for c in columns if c not in probe_cols and c != "healpix29"]
            other = _take_from_groups(pf, info, every, rows, rest, schema) if rest else None
        cols = []
        for c in columns:
            if c == "healpix29":
                cols.append(pa.array(hp[rows], type=pa.int64()))
            elif c in probe_cols:
                cols.append(probe.column(c))
            else:
                cols.append(other.column(c))
        return pa.Table.from_arrays(cols, schema=out_schema)

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        t = self.table(table)
        if not t.positional:
            raise ArchiveError(f"table {table!r} has no positions")
        cols = self._columns(t, columns)
        return frame_from_arrow(self._retrying(lambda m: self._region_arrow(m, t, region, cols, current_only)))

    def _value_set(self, t: Table, column: str, values) -> pa.Array:
        arr = values if isinstance(values, np.ndarray) else np.asarray(list(values))
        return pa.array(arr, type=t.column(column).arrow_type)

    def _candidates(self, t: Table, entries: list, column: str, sorted_values: np.ndarray | None,
                    spans: bool = False) -> list:
        """Entries whose manifest id range (kept for the id column) can hold one of the values;
        entries without a range (written before ranges were kept) always can.  ``spans``:
        ``sorted_values`` is [min, max] of the values and any overlap with it counts."""
        if sorted_values is None or column != t.id_column or not entries:
            return entries
        ranges = [m.get("id") for _, m in entries]
        known = np.array([r is not None for r in ranges])
        ok = ~known
        if known.any():
            bounds = np.array([r for r in ranges if r is not None], dtype=sorted_values.dtype)
            if spans:
                ok[known] = (bounds[:, 0] <= sorted_values[1]) & (bounds[:, 1] >= sorted_values[0])
            else:
                ok[known] = _any_value_within(sorted_values, bounds[:, 0], bounds[:, 1])
        return [e for e, keep in zip(entries, ok) if keep]

    def _select_in(self, t: Table, entries: list, column: str, values: pa.Array,
                   columns: list[str]) -> pa.Table:
        """Rows of ``entries`` whose ``column`` is in ``values``: files and row groups
        are skipped by their statistics, other columns decoded only where rows match."""
        schema = self._schema(t)
        out_schema = pa.schema([schema.field(c) for c in columns])
        v = _sorted_values(values)
        parts = []
        for path, meta in self._candidates(t, entries, column, v):
            info = self._footers.get(path, meta, schema)
            groups = _groups_holding(info, column, v)
            if not groups.size:
                continue
            with _parquet_file(path, metadata=info.metadata) as pf:
                probe = _read_groups(pf, info, groups, [column], schema)
                idx = np.flatnonzero(pc.is_in(probe.column(column), value_set=values)
                                     .to_numpy(zero_copy_only=False))
                if idx.size:
                    parts.append(_take_from_groups(pf, info, groups, idx, columns, schema).select(columns))
        if not parts:
            return out_schema.empty_table()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def get(self, table: str, ids: Sequence, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.table(table)
        cols = self._columns(t, columns)
        values = self._value_set(t, t.id_column, ids)
        return frame_from_arrow(self._retrying(
            lambda m: self._select_in(t, self._entries(m, table), t.id_column, values, cols)))

    def read_table(self, table: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """All rows of a table (use SQL or region queries for large tables)."""
        t = self.table(table)
        cols = self._columns(t, columns)
        return frame_from_arrow(self._retrying(lambda m: self._read(t, self._entries(m, table), cols)))

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
                        try:
                            listed = ", ".join(_sql_string(f) for f in files)
                            con.execute(f'CREATE VIEW "{t.name}" AS SELECT * FROM read_parquet('
                                        f"[{listed}], union_by_name=false, hive_partitioning=false)")
                        except duckdb.IOException as exc:  # a commit since the manifest read dropped
                            if "No files found" in str(exc):  # a file (a merge): the caller retries
                                raise FileNotFoundError(str(exc).splitlines()[0]) from None
                            raise
                    else:
                        empty = t.arrow_schema.empty_table()
                        con.register("_empty", empty)
                        con.execute(f'CREATE TABLE "{t.name}" AS SELECT * FROM _empty')
                        con.unregister("_empty")
            finally:
                con.close()
            self._duck_generation = gen
        return path

    def sql(self, query: str, timeout: float | None = None) -> pd.DataFrame:
        """One read-only query through DuckDB over the current snapshot.

        Behind the parser guard (:func:`check_duckdb_query`), the connection is
        read-only, may touch only the snapshot's Parquet files (``allowed_paths``;
        no other file, URL or extension), cannot install or load extensions,
        has its configuration locked and is interrupted after ``timeout`` s."""
        check_duckdb_query(query)
        limit = self.sql_timeout if timeout is None else float(timeout)

        def run(manifest):
            files = [str(f) for t in self.schema for f in self._files(manifest, t.name)]
            con = duckdb.connect(self._duck_database(manifest), read_only=True,
                                 config={"autoinstall_known_extensions": False,
                                         "autoload_known_extensions": False})
            timer = threading.Timer(limit, con.interrupt)
            try:
                con.execute("SET allowed_paths = [" + ", ".join(_sql_string(f) for f in files) + "]")
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
                timer.start()
                return con.sql(query).to_arrow_table()
            except duckdb.Error as exc:
                msg = str(exc).splitlines()[0]
                if isinstance(exc, duckdb.InterruptException):
                    raise ArchiveError(f"SQL query cancelled after {limit:g} s (timeout)") from None
                if "read-only" in msg.lower() or "read only" in msg.lower():
                    raise ReadOnlyError(f"archive SQL is read-only: {msg}") from None
                if isinstance(exc, duckdb.PermissionException):
                    raise ReadOnlyError(f"archive SQL reads the archive's tables only: {msg}") from None
                if isinstance(exc, duckdb.IOException) and ("No files found" in msg
                                                            or "No such file or directory" in msg):
                    raise FileNotFoundError(msg) from None  # a commit since dropped a file: retry
                raise ArchiveError(f"SQL error: {msg}") from None
            finally:
                timer.cancel()
                con.close()

        rows = self._retrying(run)
        # unaliased expressions named as PostgreSQL names them (count(*) -> count), as on the other backend
        return frame_from_arrow(rows.rename_columns(postgres_names(query, rows.column_names)))

    def close(self) -> None:
        self._healpix.clear()
        if self._duck_dir is not None:
            self._duck_dir.cleanup()
            self._duck_dir = None

    # -- writing -------------------------------------------------------------
    def transaction(self, auto_compact: bool | None = None) -> ParquetTransaction:
        """A write transaction; ``auto_compact`` overrides the store's setting for it."""
        return ParquetTransaction(self, self.auto_compact if auto_compact is None else auto_compact)

    # -- HATS metadata ------------------------------------------------------
    def _write_hats_metadata(self, t: Table, files: dict, full_metadata: bool = False) -> None:
        """The HATS files of one table (and of its margin catalog and collection) for the
        live ``files`` (rel -> manifest entry), each replaced atomically.

        Positional tables: ``hats.properties`` / ``properties``, ``partition_info.csv``,
        ``point_map.fits`` / ``skymap.fits``, ``dataset/_common_metadata`` and
        ``dataset/_metadata`` (while at most ``HATS_METADATA_MAX_CHUNKS`` column chunks,
        or always with ``full_metadata``; else removed); the margin catalog the same way
        when every file has its margin rows (files of older stores lack them until
        :meth:`compact` rewrites them), and ``collection.properties``.  Other tables: no
        HATS properties (a plain Parquet dataset with its ``_common_metadata``)."""
        tdir = f"{self._root}/{t.name}"
        ds = f"{tdir}/dataset"
        os.makedirs(ds, exist_ok=True)
        schema = self._schema(t)
        self._write_common_metadata(ds, schema)
        self._write_metadata_file("data", t, ds, {rel: meta["rows"] for rel, meta in files.items()}, full_metadata)
        if not t.positional:
            for name in ("hats.properties", "properties", "partition_info.csv", "point_map.fits", "skymap.fits"):
                _unlink(f"{tdir}/{name}")
            return
        counts: dict[int, int] = {}
        size = 0
        for meta in files.values():
            counts[meta["npix"]] = counts.get(meta["npix"], 0) + meta["rows"]
            size += meta.get("bytes") or 0
        kind = "object" if t.name in ("dia_object", "matched_source") else "source"
        _atomic_write(pathlib.Path(f"{tdir}/partition_info.csv"),
                      hatslayout.partition_info_csv((self.order, p) for p in counts))
        point_map = hatslayout.point_map_fits(self.order, counts)
        _atomic_write(pathlib.Path(f"{tdir}/point_map.fits"), point_map)
        _atomic_write(pathlib.Path(f"{tdir}/skymap.fits"), point_map)
        props = hatslayout.catalog_properties(t.name, kind, sum(counts.values()), self.order,
                                              max(counts.values(), default=0), len(counts), size)
        _atomic_write(pathlib.Path(f"{tdir}/hats.properties"), props)
        _atomic_write(pathlib.Path(f"{tdir}/properties"), props)
        # the margin catalog and the collection that pairs it with the table
        mdir, coll = self._margin_dir(t.name), self._collection_dir(t.name)
        mname = mdir.rpartition("/")[2]
        os.makedirs(f"{mdir}/dataset", exist_ok=True)
        complete = all("margin" in meta for meta in files.values())
        if complete:
            mcounts: dict[int, int] = {}
            mfiles: dict[str, int] = {}
            for rel, meta in files.items():
                for npix, n in meta["margin"]:
                    mcounts[npix] = mcounts.get(npix, 0) + n
                    mfiles[self._margin_rel(rel, npix)] = n
            self._write_common_metadata(f"{mdir}/dataset", schema)
            self._write_metadata_file("margin", t, f"{mdir}/dataset", mfiles, full_metadata)
            _atomic_write(pathlib.Path(f"{mdir}/partition_info.csv"),
                          hatslayout.partition_info_csv((self.order, p) for p in mcounts))
            mprops = hatslayout.margin_properties(mname, t.name, self.margin_arcsec, sum(mcounts.values()),
                                                  self.order)
            _atomic_write(pathlib.Path(f"{mdir}/hats.properties"), mprops)
            _atomic_write(pathlib.Path(f"{mdir}/properties"), mprops)
        else:  # not a margin catalog until every file has its margin rows
            for name in ("hats.properties", "properties"):
                _unlink(f"{mdir}/{name}")
        _atomic_write(pathlib.Path(f"{coll}/collection.properties"),
                      hatslayout.collection_properties(t.name, f"../../{t.name}", mname if complete else None))

    def _write_common_metadata(self, ds: str, schema: pa.Schema) -> None:
        path = pathlib.Path(f"{ds}/_common_metadata")
        if not path.exists():
            sink = pa.BufferOutputStream()
            pq.write_metadata(schema, sink)
            _atomic_write(path, sink.getvalue().to_pybytes())

    def _write_metadata_file(self, kind: str, t: Table, ds: str, rel_rows: dict, full: bool) -> None:
        """``ds/_metadata`` from the footers of the files ``rel_rows`` (rel -> rows), or no
        ``_metadata`` when that would cost more than a commit should (see
        ``HATS_METADATA_MAX_CHUNKS``) or the files' schemas differ (older writer settings)."""
        path = f"{ds}/_metadata"
        schema = self._schema(t)
        chunks = sum(-(-int(n) // ROW_GROUP_ROWS) for n in rel_rows.values()) * len(schema)
        cache = self._file_md.setdefault((kind, t.name), {})
        if not rel_rows or (not full and chunks > HATS_METADATA_MAX_CHUNKS):
            cache.clear()
            _unlink(path)
            return
        for gone in set(cache) - set(rel_rows):
            del cache[gone]
        mds = []
        for rel in sorted(rel_rows):
            md = cache.get(rel)
            if md is None:
                md = cache[rel] = _read_metadata(f"{ds}/{rel}")
                md.set_file_path(rel)
            mds.append(md)
        tmp = f"{ds}/._metadata.{uuid.uuid4().hex}.tmp"
        try:
            pq.write_metadata(schema, tmp, metadata_collector=mds)
            os.replace(tmp, path)
        except (pa.ArrowException, RuntimeError, ValueError) as exc:
            log.info("%s: no _metadata for %s (%s)", self.root, ds, exc)
            _unlink(tmp)
            _unlink(path)

    def write_hats_metadata(self, tables: Sequence[str] | None = None) -> None:
        """Rewrite every HATS file of ``tables`` (default: all), ``_metadata`` included
        whatever the table's size (a later commit that finds it too large to keep
        current removes it again).  Takes the writer lock."""
        with self.transaction(auto_compact=False) as tx:
            tx.refresh = {self.table(name).name for name in (tables or [t.name for t in self.schema])}
            tx.full_metadata = True

    def write_hats_margins(self, tables: Sequence[str] | None = None) -> int:
        """Complete the margin catalogs of ``tables`` (default: all positional ones): give
        every file written without margin rows (a bulk transaction, see
        ``MARGIN_MAX_FILES``, or an older store) its margin files, without rewriting it;
        HATS metadata written in full.  Returns the number of files completed."""
        n = 0
        with self.transaction(auto_compact=False) as tx:
            names = [self.table(name).name for name in (tables or [t.name for t in self.schema])]
            tx.refresh = set(names)
            tx.full_metadata = True
            for name in names:
                if not self.table(name).positional:
                    continue
                for rel, meta in tx.base["tables"][name]["files"].items():
                    if "margin" not in meta:
                        tx._add_margins(name, rel)
                        n += 1
        return n

    def compact(self, tables: Sequence[str] | None = None, min_files: int = 2) -> dict[str, int]:
        """Merge each partition's files into one sorted file (one atomic transaction).

        Transactions already keep partitions at a few files each (automatic
        compaction); this takes every partition of ``tables`` down to one, e.g.
        before a read-heavy phase.  Merged files get their margin rows, and so do
        the files left as they are that lack them (see :meth:`write_hats_margins`);
        the HATS metadata of ``tables`` is written in full (``_metadata`` whatever
        the size).
        The merged-away files move to ``_retired/`` at the commit (kept
        ``retain_seconds`` for readers, unlinked by a later commit).  Returns the
        number of files removed per table.
        """
        removed: dict[str, int] = {}
        names = list(tables or [t.name for t in self.schema])
        with self.transaction(auto_compact=False) as tx:  # it leaves partitions at one file already
            tx.refresh = set(names)
            tx.full_metadata = True
            for name in names:
                t = self.table(name)
                live = tx._live(name)
                groups: dict = {}
                for rel, meta in live.items():
                    groups.setdefault((meta.get("norder"), meta.get("npix")), []).append(rel)
                n = 0
                for rels in groups.values():
                    if len(rels) < min_files:
                        if t.positional and "margin" not in live[rels[0]]:  # completes the margin catalog
                            tx._add_margins(name, rels[0])
                        continue
                    rows = self._read(t, [(tx._path(name, r), live[r]) for r in rels], self._schema(t).names)
                    for r in rels:
                        tx._forget(name, r)
                    tx.append(name, rows, check_keys=False)
                    n += len(rels) - 1
                removed[name] = n
        return removed

    # -- crash recovery -------------------------------------------------------
    def recover(self) -> int:
        """Clean up after writers that died; returns how many files were deleted.

        Called by every transaction after it takes the lock.  A writer killed before
        publishing left only its staging folder in ``_txn/`` (deleted); one killed
        while publishing or just after its commit left a journal naming every file it
        moved: each is put where the committed manifest says (in place, retired, or
        away), and the HATS metadata rewritten from the manifest."""
        txn_dir = self.root / "_txn"
        txn_dir.mkdir(exist_ok=True)
        manifest = self.manifest()
        removed = 0
        interrupted = False
        for journal in sorted(txn_dir.glob("*.json")):
            try:
                entry = json.loads(journal.read_text())
            except (OSError, ValueError):
                entry = {}
            stage = f"{txn_dir}/{entry['txid']}" if entry.get("txid") else None
            removed += self._reconcile(manifest, entry, stage)
            journal.unlink()
            interrupted = True
        for stage in txn_dir.iterdir():  # staging folders of writers that died before publishing
            if stage.is_dir():
                removed += sum(1 for p in stage.rglob("*") if p.is_file())
                shutil.rmtree(stage, ignore_errors=True)
        # temporaries of _atomic_write (journals, manifest, HATS metadata) of a dead
        # writer: only writers make them, and we hold the lock
        dirs = [txn_dir, self.root]
        for t in self.schema:
            dirs += [self.root / t.name, self.root / t.name / "dataset"]
            if t.positional:
                dirs += [pathlib.Path(self._collection_dir(t.name)), pathlib.Path(self._margin_dir(t.name)),
                         pathlib.Path(self._margin_dir(t.name)) / "dataset"]
        for d in dirs:
            for tmp in d.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if interrupted:
            # a writer killed between its HATS metadata and its manifest commit left
            # metadata describing files it never committed: rewrite it from the manifest
            for t in self.schema:
                self._write_hats_metadata(t, manifest["tables"][t.name]["files"])
        if removed:
            log.warning("%s: removed %d file(s) left by an interrupted write", self.root, removed)
        return removed

    def _reconcile(self, manifest: dict, entry: dict, stage: str | None) -> int:
        """Put each file a journal ``entry`` names ([table, rel, margin partitions] under
        new / drop / expire) and its margin files where ``manifest`` says: live files in
        place, retired ones in ``_retired/``, others nowhere (staged copies in ``stage``
        included); margin files added to a committed file (``margin_add``) stay only if
        the manifest lists them.  Returns the number of files deleted."""
        tables = manifest["tables"]
        retired = {(e[0], e[1]) for e in manifest.get("retired", [])}
        removed = 0
        touched: list[str] = []
        for rec in entry.get("margin_add", []):
            table, rel = rec[0], rec[1]
            meta = tables.get(table, {}).get("files", {}).get(rel)
            have = {int(m[0]) for m in meta.get("margin", [])} if meta is not None else set()
            for npix in rec[2]:
                (place, staged), = self._physical(table, rel, [npix], stage)[1:]
                if int(npix) in have:
                    if not os.path.exists(place) and staged and os.path.exists(staged):
                        os.makedirs(os.path.dirname(place), exist_ok=True)
                        os.replace(staged, place)
                else:
                    removed += sum(_unlink(p) for p in (place, staged) if p)
                    touched.append(place)
        records = [r for key in ("new", "drop", "expire") for r in entry.get(key, [])]
        for rec in records:
            table, rel = rec[0], rec[1]
            if table not in tables:
                continue
            meta = tables[table]["files"].get(rel)
            margins = [m[0] for m in meta.get("margin", [])] if meta is not None else (rec[2] if len(rec) > 2 else [])
            for place, staged in self._physical(table, rel, margins, stage):
                aside = self._retired(place)
                target = place if meta is not None else aside if (table, rel) in retired else None
                spots = [p for p in (place, aside, staged) if p]
                if target is not None and not os.path.exists(target):
                    src = next((p for p in spots if p != target and os.path.exists(p)), None)
                    if src is None:
                        log.warning("%s: %s is listed but missing", self.root, target)
                    else:
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        os.replace(src, target)
                for p in spots:
                    if p != target and _unlink(p):
                        removed += 1
                touched += [place, aside]
        self._prune_dirs(touched)
        return removed


def _lock_store(root: pathlib.Path):
    """Take the store's writer lock (fcntl on ROOT/.lock, holding our PID); the open file."""
    fh = open(root / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            fh.close()
            raise
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise StoreLockedError(f"archive {root} is locked by {holder}; "
                               "another writer is active, try again when it finishes") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"PID {os.getpid()} (since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})")
    fh.flush()
    return fh


def _unlock_store(fh) -> None:
    with contextlib.suppress(OSError):
        fh.seek(0)
        fh.truncate()
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


class ParquetTransaction(Transaction):
    """Holds the store's write lock from creation until commit or rollback.

    Its files are written into its own staging folder (``_txn/<txid>/``) and moved
    into the dataset folders only at commit (see the module docstring)."""

    def __init__(self, store: ParquetStore, auto_compact: bool = True) -> None:
        self.store = store
        #: merge same-tier files of the partitions this transaction wrote, at commit
        self.auto_compact = auto_compact
        #: merges done at commit: (table, npix, files merged, rows)
        self.merges: list[tuple[str, int | None, int, int]] = []
        #: tables whose HATS metadata the commit rewrites even if it changes nothing in them
        self.refresh: set[str] = set()
        #: write ``_metadata`` whatever the table's size (compact, write_hats_metadata)
        self.full_metadata = False
        self._lock_fh = self._acquire_lock()
        try:
            store.recover()
            self.base = store.manifest()
            if self.base.get("layout") != LAYOUT:  # a store written before files were moved aside
                store._reconcile_all(self.base)
                self.refresh = {t.name for t in store.schema}
        except BaseException:
            self._release()
            raise
        self.txid = f"{self.base['generation'] + 1:012d}-{uuid.uuid4().hex[:8]}"
        self.stage = f"{store._root}/_txn/{self.txid}"
        self._new: list[tuple[str, str, dict]] = []     # (table, rel, meta), staged
        self._mine: dict[tuple[str, str], str] = {}     # (table, rel) of _new -> staged path
        self._new_meta: dict[tuple[str, str], dict] = {}  # (table, rel) of _new -> its entry
        self._records: list = []                        # what the journal names (for an undo)
        self._margin_adds: dict[tuple[str, str], list] = {}  # committed file -> margin rows added now
        self._drop: list[tuple[str, str]] = []          # (table, rel), committed files leaving
        self._expire: list[list] = []                   # retired entries this commit unlinks
        self._file_md: dict[tuple[str, str, str], pq.FileMetaData] = {}  # footers of staged files
        self._done = False

    def _acquire_lock(self):
        return _lock_store(self.store.root)

    def _release(self) -> None:
        if self._lock_fh is not None:
            _unlock_store(self._lock_fh)
            self._lock_fh = None

    # -- bookkeeping ------------------------------------------------------------
    def _margins(self, table: str, rel: str) -> list[int]:
        """Partitions whose margin catalog holds rows of file ``rel`` (staged or committed)."""
        meta = self._new_meta.get((table, rel)) or self.base["tables"][table]["files"].get(rel, {})
        return [int(m[0]) for m in meta.get("margin", [])]

    def _journal(self, drops: list, expire: list) -> None:
        """What the commit is about to move (written before the first rename): a writer
        killed from then on is finished or undone by the next one (``recover``)."""
        entry = {"txid": self.txid,
                 "new": [[t, rel, [m[0] for m in meta.get("margin", [])]] for t, rel, meta in self._new],
                 "drop": [[t, rel, self._margins(t, rel)] for t, rel in drops],
                 "expire": [[e[0], e[1], e[3] if len(e) > 3 else []] for e in expire],
                 "margin_add": [[t, rel, [m[0] for m in margin]] for (t, rel), margin in self._margin_adds.items()]}
        self._records = entry
        _atomic_write(self.store.root / "_txn" / f"{self.txid}.json", json.dumps(entry).encode())

    def _live(self, table: str) -> dict:
        """Files of ``table`` as this transaction will leave them (base - drops + news)."""
        dropped = {rel for t, rel in self._drop if t == table}
        files = {rel: meta for rel, meta in self.base["tables"][table]["files"].items() if rel not in dropped}
        files.update({rel: meta for t, rel, meta in self._new if t == table})
        for (t, rel), margin in self._margin_adds.items():
            if t == table and rel in files:
                files[rel] = {**files[rel], "margin": margin}
        return files

    def _path(self, table: str, rel: str) -> str:
        """Where file ``rel`` is now: staged (this transaction's) or in its dataset folder."""
        return self._mine.get((table, rel)) or self.store._data_path(table, rel)

    def _live_entries_rel(self, table: str, partitions: Iterable[int] | None = None) -> list[tuple[str, dict, str]]:
        wanted = None if partitions is None else {int(p) for p in partitions}
        return [(self._path(table, rel), meta, rel) for rel, meta in self._live(table).items()
                if wanted is None or meta.get("npix") in wanted]

    def _live_entries(self, table: str, partitions: Iterable[int] | None = None) -> list[tuple[str, dict]]:
        """(path, manifest entry) of the files this transaction sees, optionally of some partitions."""
        return [(path, meta) for path, meta, _ in self._live_entries_rel(table, partitions)]

    def _view(self, table: str) -> dict:
        """A manifest-like view of ``table`` as this transaction sees it, for the store's readers."""
        return {"generation": self.base["generation"],
                "tables": {table: {"files": self._live(table),
                                   "paths": {rel: p for (t, rel), p in self._mine.items() if t == table}}}}

    def _check_new_keys(self, t: Table, rows: pa.Table) -> None:
        """Refuse keys that already exist (the Parquet twin of a primary-key constraint).

        Only files whose id range (kept in their manifest entry) can hold one of
        the batch's ids are opened, and in them only the row groups whose
        statistics can; with increasing ids a new batch usually opens nothing."""
        key = t.id_column
        entries = self._live_entries(t.name)
        if not entries or not rows.num_rows:
            return
        ids = rows.column(key).combine_chunks()
        # first by the batch's id span alone (O(n), no sort): usually no file is left
        span = pc.min_max(ids)
        entries = self.store._candidates(t, entries, key, np.array([span["min"].as_py(), span["max"].as_py()]),
                                         spans=True)
        if not entries:
            return
        cols = list(t.primary_key)
        stored = self.store._select_in(t, entries, key, ids, cols)
        if stored.num_rows and len(cols) > 1:  # same id: compare the whole key
            stored = stored.join(rows.select(cols), keys=cols, join_type="inner").select(cols)
        if stored.num_rows:
            example = tuple(stored.slice(0, 1).to_pylist()[0].values())
            raise ValidationError(f"table {t.name!r}: {stored.num_rows} row(s) already stored with the same "
                                  f"key ({', '.join(t.primary_key)}), e.g. {example}; nothing written")

    def _new_rel(self, npix: int | None) -> str:
        """A fresh file name (relative to the table's dataset directory) in partition ``npix``."""
        name = f"part-{self.base['generation'] + 1:08d}-{uuid.uuid4().hex[:12]}.parquet"
        if npix is None:
            return name
        return f"Norder={self.store.order}/Dir={npix // 10000 * 10000}/Npix={npix}/{name}"

    def _new_files(self, table: str, t: Table, parts: list) -> None:
        """Write one staged file per (partition, rows, id range, margin pairs) -- with its
        margin files -- and add them to what this transaction commits."""
        if not parts:
            return
        jobs = []
        for npix, rows, ids, margin in parts:
            meta = {"rows": rows.num_rows, "npix": npix, "norder": self.store.order if npix is not None else None,
                    "id": ids}
            jobs.append((table, t, self._new_rel(npix), rows, meta, margin))
        if len(jobs) == 1 or WRITE_THREADS == 1:
            done = [self._write_staged(*job) for job in jobs]
        else:  # many small files (a sparse batch touches many partitions): write them in parallel
            with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
                done = list(pool.map(lambda job: self._write_staged(*job), jobs))
        for (table, _, rel, _, meta, _), mds in zip(jobs, done):
            self._add_new(table, rel, meta, mds)

    def _add_new(self, table: str, rel: str, meta: dict, mds: dict) -> None:
        self._new.append((table, rel, meta))
        self._new_meta[(table, rel)] = meta
        self._mine[(table, rel)] = self.store._staged(self.stage, table, rel)
        self._file_md.update(mds)

    def _write_staged(self, table: str, t: Table, rel: str, rows: pa.Table, meta: dict,
                      margin: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
        """Write a data file into the staging folder, and for a positional table the rows
        the margin catalogs of its neighbouring partitions get from it (one file per
        partition, see :func:`archive.catalog.hats.margin_targets`; ``margin``: those
        (row, partition) pairs, sorted by partition, when already known).  Fills in the
        entry's ``bytes`` and ``margin``; returns the footers (for ``_metadata``)."""
        meta["bytes"], md = _write_file(self.store._staged(self.stage, table, rel), rows)
        md.set_file_path(rel)
        mds = {("data", table, rel): md}
        if t.positional and margin is not False:
            meta["margin"] = self._write_margins(table, rel, rows, margin, mds)
        return mds

    def _write_margins(self, table: str, rel: str, rows: pa.Table, margin: tuple | None, mds: dict) -> list:
        """Stage the margin files of data file ``rel`` (``rows``: its rows; ``margin``: its
        (row, partition) pairs sorted by partition, or None to compute them); returns
        its manifest ``margin`` list [[partition, rows], ...] and adds the footers to ``mds``."""
        if margin is None:
            margin = hatslayout.margin_targets(rows.column("healpix29").to_numpy(), self.store.order,
                                               self.store.margin_order)
        idx, targets = margin
        out = []
        if idx.size:
            cuts = np.flatnonzero(np.diff(targets)) + 1
            for a, b in zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [idx.size]]).tolist()):
                npix = int(targets[a])
                _, mmd = _write_file(self.store._staged(self.stage, table, rel, npix),
                                     rows.take(pa.array(idx[a:b], type=pa.int64())))
                mrel = self.store._margin_rel(rel, npix)
                mmd.set_file_path(mrel)
                mds[("margin", table, mrel)] = mmd
                out.append([npix, b - a])
        return out

    def _add_margins(self, table: str, rel: str) -> None:
        """Give a committed data file its margin rows (one it was written without: a
        bulk transaction, an older store), without rewriting it."""
        meta = self.base["tables"][table]["files"][rel]
        t = self.store.table(table)
        schema = self.store._schema(t)
        path = self.store._data_path(table, rel)
        info = self.store._footers.get(path, meta, schema, keep=False)
        with _parquet_file(path, metadata=info.metadata) as pf:
            hp29 = _read_groups(pf, info, np.arange(info.n_groups), ["healpix29"], schema).column(0).to_numpy()
            idx, targets = hatslayout.margin_targets(hp29, self.store.order, self.store.margin_order)
            need = np.unique(idx)  # the rows any margin gets, in file order, once each
            rows = (_take_from_groups(pf, info, np.arange(info.n_groups), need, schema.names, schema)
                    if need.size else schema.empty_table())
        # positions within the rows read, sorted by partition (as margin_targets gives them)
        local = np.searchsorted(need, idx)
        mds: dict = {}
        self._margin_adds[(table, rel)] = self._write_margins(table, rel, rows, (local, targets), mds)
        self._file_md.update(mds)

    def append(self, table: str, rows: pa.Table, check_keys: bool = True) -> None:
        """Append rows; ``check_keys=False`` skips the stored-key scan for rows whose
        keys are new by construction (rewritten rows, fresh object versions)."""
        if self._done:
            raise ArchiveError("transaction already finished")
        t = self.store.table(table)
        schema = self.store._schema(t)
        if rows.schema != schema:
            rows = rows.cast(schema)
        if check_keys:
            self._check_new_keys(t, rows)
        if not rows.num_rows:
            return
        if t.positional:
            rows = rows.sort_by("healpix29")
            hp29 = rows.column("healpix29").to_numpy()
            part = partition_pixel(hp29, self.store.order)
            bounds = np.flatnonzero(np.diff(part)) + 1
            starts = np.concatenate([[0], bounds]).astype(np.int64)
            ends = np.concatenate([bounds, [len(part)]]).astype(np.int64)
            # margin rows of the whole batch at once, then per file by partition (unless the
            # transaction writes too many files: then compact adds them, MARGIN_MAX_FILES)
            with_margins = len(self._new) + len(starts) <= MARGIN_MAX_FILES
            m_rows, m_targets = (hatslayout.margin_targets(hp29, self.store.order, self.store.margin_order)
                                 if with_margins else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
            order = np.lexsort((m_targets, m_rows))
            m_rows, m_targets = m_rows[order], m_targets[order]
            m_cut = np.searchsorted(m_rows, np.concatenate([starts, ends[-1:]]))
        else:
            starts, ends = np.array([0]), np.array([rows.num_rows])
        # id range per file (manifest entry): the key check skips files that cannot clash
        ids = rows.column(t.id_column).to_numpy()
        id_lo, id_hi = np.minimum.reduceat(ids, starts), np.maximum.reduceat(ids, starts)
        parts = []
        for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            margin = None
            if t.positional and not with_margins:
                margin = False
            elif t.positional:
                a, b = int(m_cut[i]), int(m_cut[i + 1])
                local, tg = m_rows[a:b] - s, m_targets[a:b]
                by_target = np.argsort(tg, kind="stable")
                margin = (local[by_target], tg[by_target])
            parts.append((int(part[s]) if t.positional else None, rows.slice(s, e - s),
                          [id_lo[i].item(), id_hi[i].item()], margin))
        self._new_files(table, t, parts)

    def delete(self, table: str, column: str, values: Sequence,
               partitions: Iterable[int] | None = None) -> int:
        """Rewrite the files holding matching rows without them (copy-on-write)."""
        t = self.store.table(table)
        t.column(column)
        schema = self.store._schema(t)
        value_set = self.store._value_set(t, column, values)
        if len(value_set) == 0:
            return 0
        v = _sorted_values(value_set)
        deleted = 0
        entries = self._live_entries_rel(table, partitions)
        rels = {path: rel for path, _, rel in entries}
        for path, meta in self.store._candidates(t, [(p, m) for p, m, _ in entries], column, v):
            info = self.store._footers.get(path, meta, schema)
            if not _groups_holding(info, column, v).size:
                continue
            with _parquet_file(path, metadata=info.metadata) as pf:
                hit = pc.is_in(_read_groups(pf, info, np.arange(info.n_groups), [column], schema).column(column),
                               value_set=value_set)
                n = pc.sum(hit).as_py() or 0
                if not n:
                    continue
                keep = _read_groups(pf, info, np.arange(info.n_groups), schema.names, schema).filter(pc.invert(hit))
            deleted += n
            self._forget(table, rels[path])
            if keep.num_rows:
                self.append(table, keep, check_keys=False)
        return deleted

    def query_region(self, table: str, region, columns: Sequence[str] | None = None,
                     current_only: bool = False) -> pd.DataFrame:
        t = self.store.table(table)
        cols = self.store._columns(t, columns)
        return frame_from_arrow(self.store._region_arrow(self._view(table), t, region, cols, current_only))

    def select_in(self, table: str, column: str, values: Sequence,
                  partitions: Iterable[int] | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
        t = self.store.table(table)
        t.column(column)
        cols = self.store._columns(t, columns)
        value_set = self.store._value_set(t, column, values)
        return frame_from_arrow(self.store._select_in(t, self._live_entries(table, partitions), column,
                                                      value_set, cols))

    def close_versions(self, table: str, ids: Sequence, end: float,
                       partitions: Iterable[int] | None = None) -> int:
        """Set ``validity_end = end`` on the open versions of ``ids`` (copy-on-write).

        Only files whose id range and row-group statistics admit one of the ids
        and that still hold open versions are probed (id + validity_end); each
        file holding one is read once, in Arrow, and the touched files of a
        partition are rewritten together as one file, so a partition's file
        count does not grow with the visits that close its versions."""
        t = self.store.table(table)
        if "validity_end" not in t:
            raise ArchiveError(f"table {table!r} has no versions (no validity_end column)")
        schema = self.store._schema(t)
        key = t.id_column
        value_set = self.store._value_set(t, key, np.asarray(ids, dtype=np.int64))
        if len(value_set) == 0:
            return 0
        v = _sorted_values(value_set)
        end_col = schema.get_field_index("validity_end")
        entries = self._live_entries_rel(table, partitions)
        rels = {path: rel for path, _, rel in entries}
        rewritten: dict = {}  # partition -> [file rows with the versions closed]
        closed = 0
        for path, meta in self.store._candidates(t, [(p, m) for p, m, _ in entries], key, v):
            info = self.store._footers.get(path, meta, schema)
            groups = _groups_holding(info, key, v)
            nulls = info.null_counts("validity_end")
            if nulls is not None:  # groups without an open version need no probe
                groups = groups[nulls[groups] > 0]
            if not groups.size:
                continue
            with _parquet_file(path, metadata=info.metadata) as pf:
                probe = _read_groups(pf, info, groups, [key, "validity_end"], schema)
                hit = (pc.is_in(probe.column(key), value_set=value_set).to_numpy(zero_copy_only=False)
                       & probe.column("validity_end").is_null().to_numpy(zero_copy_only=False))
                if not hit.any():
                    continue
                rows = _read_groups(pf, info, np.arange(info.n_groups), schema.names, schema)
            # positions of the hits in the whole file: group starts + offsets within the probed groups
            file_starts = np.concatenate([[0], np.cumsum(info.group_rows)])
            probe_starts = np.concatenate([[0], np.cumsum(info.group_rows[groups])])
            idx = np.flatnonzero(hit)
            g = np.searchsorted(probe_starts, idx, side="right") - 1
            mask = np.zeros(rows.num_rows, dtype=bool)
            mask[file_starts[groups[g]] + idx - probe_starts[g]] = True
            ends = pc.if_else(pa.array(mask), pa.scalar(float(end), pa.float64()), rows.column(end_col))
            rows = rows.set_column(end_col, schema.field("validity_end"), ends)
            closed += int(idx.size)
            self._forget(table, rels[path])
            rewritten.setdefault((meta.get("norder"), meta.get("npix")), []).append(rows)
        for parts in rewritten.values():
            self.append(table, pa.concat_tables(parts) if len(parts) > 1 else parts[0], check_keys=False)
        return closed

    def _forget(self, table: str, rel: str) -> None:
        """Take a file out of the state this transaction commits: a committed file is
        dropped at commit, a file this transaction wrote (staged, never visible) is
        deleted now, with its margin files."""
        if (table, rel) in self._mine:
            margins = self._margins(table, rel)
            self._new = [(tt, r, m) for tt, r, m in self._new if not (tt == table and r == rel)]
            del self._mine[(table, rel)]
            del self._new_meta[(table, rel)]
            for _, staged in self.store._physical(table, rel, margins, self.stage):
                _unlink(staged)
            self._file_md.pop(("data", table, rel), None)
        else:
            added = self._margin_adds.pop((table, rel), None)
            for _, staged in self.store._physical(table, rel, [m[0] for m in added or []], self.stage)[1:]:
                _unlink(staged)
            self._drop.append((table, rel))

    def _merge_tiers(self) -> None:
        """Merge same-tier files of the partitions this transaction wrote (see
        :func:`plan_merges`), as part of this transaction.

        Outputs are staged like every file of the transaction and their inputs
        dropped only once all are written, so an exception or a kill leaves the
        pre-transaction state; untouched partitions are never looked at."""
        touched: dict[str, set] = {}
        for table, _, meta in self._new:
            touched.setdefault(table, set()).add(meta.get("npix"))
        jobs = []  # (table, npix, input rels)
        for table, npixes in touched.items():
            by_part: dict = {}
            for rel, meta in self._live(table).items():
                if meta.get("npix") in npixes:
                    by_part.setdefault(meta.get("npix"), []).append((rel, meta))
            for npix, files in by_part.items():
                metas = dict(files)
                for group in plan_merges([(rel, meta["rows"]) for rel, meta in files],
                                         self.store.compact_fanout, max_rows=self.store.compact_max_rows):
                    jobs.append((table, npix, [(r, metas[r]) for r in group]))
        if not jobs:
            return
        if len(jobs) == 1 or WRITE_THREADS == 1:
            outputs = [self._merge_files(*job) for job in jobs]
        else:  # partitions merge independently; pyarrow releases the GIL
            with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
                outputs = list(pool.map(lambda job: self._merge_files(*job), jobs))
        for (table, npix, inputs), (rel, meta, mds) in zip(jobs, outputs):
            for in_rel, _ in inputs:
                self._forget(table, in_rel)
            self._add_new(table, rel, meta, mds)
        self.merges += [(table, npix, len(inputs), out[1]["rows"]) for (table, npix, inputs), out in zip(jobs, outputs)]
        log.debug("%s: merged %d file(s) into %d at commit", self.store.root,
                  sum(len(j[2]) for j in jobs), len(jobs))

    def _merge_files(self, table: str, npix: int | None, inputs: list[tuple[str, dict]]) -> tuple[str, dict, dict]:
        """Write the rows of ``inputs`` (one partition's files) as one sorted staged file
        (with its margin files); returns its rel, manifest entry and footers."""
        t = self.store.table(table)
        schema = self.store._schema(t)
        parts = []
        for in_rel, in_meta in inputs:
            path = self._path(table, in_rel)
            info = self.store._footers.get(path, in_meta, schema, keep=False)
            with _parquet_file(path, metadata=info.metadata) as pf:
                parts.append(_read_groups(pf, info, np.arange(info.n_groups), schema.names, schema))
        rows = pa.concat_tables(parts)
        expected = sum(m["rows"] for _, m in inputs)
        if rows.num_rows != expected:
            raise ArchiveError(f"{table}: merging {len(inputs)} file(s) of partition {npix} read "
                               f"{rows.num_rows} rows, the manifest lists {expected}; the store is damaged")
        # positional files are sorted by healpix29 (row-group pruning); others by key (id look-ups)
        rows = rows.sort_by("healpix29" if t.positional else [(c, "ascending") for c in t.primary_key])
        span = pc.min_max(rows.column(t.id_column))
        rel = self._new_rel(npix)
        meta = {"rows": rows.num_rows, "npix": npix, "norder": self.store.order if npix is not None else None,
                "id": [span["min"].as_py(), span["max"].as_py()]}
        mds = self._write_staged(table, t, rel, rows, meta, None)
        return rel, meta, mds

    # -- commit -------------------------------------------------------------------
    def commit(self) -> None:
        if self._done:
            return
        if self.auto_compact and self._new:
            try:
                self._merge_tiers()
            except BaseException:
                self.rollback()
                raise
        published = committed = False
        try:
            # dropped files are retired (moved aside), not unlinked, for readers of the
            # previous manifest; those retired at least retain_seconds ago are unlinked
            # after this commit
            now = time.time()
            retain = self.store.retain_seconds
            old = self.base.get("retired", [])
            retired = [e for e in old if now - e[2] < retain]
            self._expire = [e for e in old if now - e[2] >= retain]
            drops = list(self._drop)
            fresh = [[t, rel, now, self._margins(t, rel)] for t, rel in drops]
            if retain > 0:
                retired += fresh
            else:
                self._expire += fresh
            if self._new or drops or self._expire or self.refresh or self._margin_adds:
                touched = {t for t, _, _ in self._new} | {t for t, _ in drops} | {t for t, _ in self._margin_adds}
                # a new dict around the base's untouched entries (never modified in place)
                manifest = {**self.base, "generation": self.base["generation"] + 1, "layout": LAYOUT,
                            "tables": {name: ({**tab, "files": self._live(name)} if name in touched else tab)
                                       for name, tab in self.base["tables"].items()},
                            "retired": retired}
                self._journal(drops, self._expire)  # before the first rename: a crash is repaired
                published = True
                self._publish(drops)
                for (kind, table, rel), md in self._file_md.items():  # footers for _metadata
                    self.store._file_md.setdefault((kind, table), {})[rel] = md
                for name in sorted(touched | self.refresh):
                    self.store._write_hats_metadata(self.store.table(name), manifest["tables"][name]["files"],
                                                    self.full_metadata)
                self.store._write_manifest(manifest)
                committed = True
                _fsync_dir(self.store.root)  # the commit point is durable
                self._remove(self._expire)
            shutil.rmtree(self.stage, ignore_errors=True)
            self._remove_journal()
        except BaseException:
            if not committed:  # put the folders back as the base manifest has them
                with contextlib.suppress(Exception):
                    if published:
                        self.store._reconcile(self.base, self._records, self.stage)
                    shutil.rmtree(self.stage, ignore_errors=True)
                    self._remove_journal()
            raise
        finally:
            self._done = True
            self._release()

    def _publish(self, drops: list[tuple[str, str]]) -> None:
        """Move the dropped files (and their margin files) to ``_retired/`` and the staged
        ones into place, partition folder by partition folder (drops first), then remove
        emptied partition folders.  Renames only: the folders switch within milliseconds."""
        store = self.store
        outs: dict[str, list[tuple[str, str]]] = {}  # partition folder -> [(src, dst)]
        ins: dict[str, list[tuple[str, str]]] = {}
        for table, rel in drops:
            for place, _ in store._physical(table, rel, self._margins(table, rel)):
                outs.setdefault(os.path.dirname(place), []).append((place, store._retired(place)))
        for table, rel, meta in self._new:
            for place, staged in store._physical(table, rel, [m[0] for m in meta.get("margin", [])], self.stage):
                ins.setdefault(os.path.dirname(place), []).append((staged, place))
        for (table, rel), margin in self._margin_adds.items():
            for place, staged in store._physical(table, rel, [m[0] for m in margin], self.stage)[1:]:
                ins.setdefault(os.path.dirname(place), []).append((staged, place))
        moves = {d: outs.get(d, []) + ins.get(d, []) for d in {**outs, **ins}}

        def move(pairs: list[tuple[str, str]]) -> None:
            made: set = set()
            if pairs and all(src.startswith(self.stage) for src, _ in pairs):
                # a partition new to the table: its staged folder (holding exactly these
                # files) moves into place whole, one rename instead of a mkdir and one each
                src_dir, dst_dir = os.path.dirname(pairs[0][0]), os.path.dirname(pairs[0][1])
                if not os.path.exists(dst_dir) and len(os.listdir(src_dir)) == len(pairs):
                    os.makedirs(os.path.dirname(dst_dir), exist_ok=True)
                    try:
                        os.rename(src_dir, dst_dir)
                        return
                    except OSError:  # appeared meanwhile (not by a writer: we hold the lock)
                        pass
            for src, dst in pairs:
                d = os.path.dirname(dst)
                if d not in made:
                    os.makedirs(d, exist_ok=True)
                    made.add(d)
                try:
                    os.replace(src, dst)
                except FileNotFoundError:
                    if not os.path.exists(dst):  # a retired file already aside is fine
                        raise
            if pairs and pairs[-1][0].startswith(self.stage):  # its staged folder is empty now
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(pairs[-1][0]))

        groups = list(moves.values())
        if len(groups) < 64 or WRITE_THREADS == 1:
            for pairs in groups:
                move(pairs)
        else:  # renames and mkdirs release the GIL
            with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
                list(pool.map(move, groups))
        store._prune_dirs(place for table, rel in drops
                          for place, _ in store._physical(table, rel, self._margins(table, rel)))

    def rollback(self) -> None:
        if self._done:
            return
        try:
            shutil.rmtree(self.stage, ignore_errors=True)  # nothing was published
            self._remove_journal()
        finally:
            self._done = True
            self._release()

    def _remove(self, entries) -> None:
        """Unlink retired files (and their margin files) whose retention ended."""
        paths = []
        for e in entries:
            for place, _ in self.store._physical(e[0], e[1], e[3] if len(e) > 3 else []):
                paths.append(self.store._retired(place))
                _unlink(paths[-1])
        self.store._prune_dirs(paths)

    def _remove_journal(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.store.root / "_txn" / f"{self.txid}.json").unlink()

    def __del__(self):  # a transaction dropped without commit releases its lock
        if getattr(self, "_lock_fh", None) is not None and not self._done:
            with contextlib.suppress(Exception):
                self.rollback()
