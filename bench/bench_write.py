"""Bulk-write benchmark: ``store.write("dia_source", df)`` on both backends vs bare COPY.

What it measures (all in one run, same rows):

* Postgres store: ``PostgresStore.write`` of N rows (default 1,000,000) into an
  empty ``dia_source`` (PK + 3 B-tree indexes), wall time and rows/s, broken
  down into stages (pandas->Arrow, validation/healpix, key-uniqueness check,
  sort by healpix29 + binary COPY encoding, COPY, commit).
* Bare COPY, into ``CREATE TABLE bare_dia_source (LIKE dia_source INCLUDING
  ALL)`` (same columns, types, PK and indexes), one transaction, bytes
  pre-encoded in memory and written in 1 MiB chunks: (a) ``FORMAT binary`` of
  the very bytes the store sends (rows sorted by healpix29, binary COPY
  tuples) -- the floor the store is compared against (goal: store within
  1.5x); (b) ``FORMAT csv`` of the rows as given, Arrow's CSV (the floor the
  store was compared against before it switched to binary COPY, kept for
  comparison with earlier figures), also with the CSV encoding added (what a
  CSV client must pay).
* Parquet store: ``ParquetStore.write`` of the same rows into an empty store,
  then a second batch of N new rows into the now non-empty store (the key check
  then has to read the stored keys), with stage break-down; beside a bare
  ``pyarrow.parquet.write_table`` of the conformed rows to one file.

Each Postgres measurement is repeated ``--repeat`` times into an emptied table
(TRUNCATE), alternating store and bare, and the median is reported.

Run:  python bench/bench_write.py [--rows 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    StageTimers,
    fresh_database,
    git_rev,
    machine_line,
    make_dia_sources,
    pg_connect,
    pg_version,
)

TABLE = "dia_source"


def _pg_stage_timers() -> StageTimers:
    from archive.catalog import postgres_store, store, validate

    st = StageTimers()
    st.wrap(store, "conform", "conform (all validation)")
    st.wrap(validate, "_as_arrow", "  pandas->Arrow")
    st.wrap(validate, "radec_to_healpix29", "  healpix29 from ra/dec")
    st.wrap(validate, "_check_unique_keys", "  in-batch key uniqueness")
    st.wrap(postgres_store.PostgresTransaction, "append", "append (sort + encode + COPY)")
    if hasattr(postgres_store, "arrow_to_copy_binary"):
        st.wrap(postgres_store, "arrow_to_copy_binary", "  binary COPY encoding (numpy)")
    st.wrap(postgres_store, "arrow_to_csv", "  CSV encoding (Arrow)")
    st.wrap(postgres_store.PostgresTransaction, "commit", "commit")
    return st


def _pq_stage_timers() -> StageTimers:
    import pyarrow.parquet as pq

    from archive.catalog import parquet_store, store, validate

    st = StageTimers()
    st.wrap(store, "conform", "conform (all validation)")
    st.wrap(validate, "_as_arrow", "  pandas->Arrow")
    st.wrap(validate, "radec_to_healpix29", "  healpix29 from ra/dec")
    st.wrap(validate, "_check_unique_keys", "  in-batch key uniqueness")
    st.wrap(parquet_store.ParquetTransaction, "__init__", "lock + recover + manifest read")
    st.wrap(parquet_store.ParquetTransaction, "append", "append (key check + sort + write)")
    st.wrap(parquet_store.ParquetTransaction, "_check_new_keys", "  key check vs stored (DuckDB)")
    st.wrap(pq, "write_table", "  pq.write_table (all files)")
    if hasattr(parquet_store, "hatslayout"):  # margin catalogs, staged files, moves at commit
        st.wrap(parquet_store.hatslayout, "margin_targets", "  margin rows (which, where)")
        st.wrap(parquet_store.ParquetTransaction, "_publish", "  publish (renames into place / aside)")
        st.wrap(parquet_store.ParquetStore, "_write_hats_metadata", "  HATS metadata + margin catalog")
    st.wrap(parquet_store.ParquetTransaction, "_journal", "  journal writes")
    st.wrap(parquet_store.ParquetTransaction, "commit", "commit (manifest + HATS metadata)")
    return st


def _print_stages(st: StageTimers, wall: float) -> None:
    for label, sec, share, calls in st.report(wall):
        print(f"      {label:<38s} {sec:8.2f} s  {100 * share:5.1f} %  ({calls} call{'s' * (calls != 1)})")


def bench_postgres(df, repeat: int) -> dict:
    import pyarrow.compute as pc

    from archive.catalog import postgres_store
    from archive.catalog.postgres_store import _PGCOPY_HEADER, _PGCOPY_TRAILER, arrow_to_copy_binary, arrow_to_csv
    from archive.catalog.backends import open_store
    from archive.catalog.validate import conform

    n = len(df)
    out: dict = {}
    with fresh_database("archive_bench_write") as url:
        store = open_store(url, create=True)
        out["server"] = pg_version(url)
        with pg_connect(url) as con:
            con.execute(f"CREATE TABLE bare_{TABLE} (LIKE {TABLE} INCLUDING ALL)")
            idx = {r[0]: r[1] for r in con.execute(
                "SELECT tablename, count(*) FROM pg_indexes WHERE tablename IN (%s, %s) GROUP BY 1",
                (TABLE, f"bare_{TABLE}"))}
        print(f"  indexes: store table {idx.get(TABLE)}, bare table {idx.get(f'bare_{TABLE}')}")
        conformed = conform(store.schema[TABLE], df)
        t0 = time.perf_counter()
        csv = arrow_to_csv(conformed)
        csv_s = time.perf_counter() - t0
        cols = ", ".join(f'"{c}"' for c in conformed.column_names)
        print(f"  CSV: {len(csv) / 1e6:.0f} MB for {n} rows ({len(csv) / n:.0f} B/row), encoded in {csv_s:.2f} s")
        t0 = time.perf_counter()
        ordered = conformed.take(pc.sort_indices(conformed.column("healpix29")))
        step = max(1024, postgres_store.COPY_CHUNK_BYTES // postgres_store._row_bytes_bound(ordered))
        binary = b"".join([_PGCOPY_HEADER] + [arrow_to_copy_binary(ordered.slice(i, step))  # store's chunks
                                              for i in range(0, n, step)] + [_PGCOPY_TRAILER])
        bin_s = time.perf_counter() - t0
        print(f"  binary COPY: {len(binary) / 1e6:.0f} MB ({len(binary) / n:.0f} B/row), sorted + encoded "
              f"in {bin_s:.2f} s")

        def bare_copy(data: bytes, fmt: str) -> float:
            with pg_connect(url, autocommit=False) as con:
                t0 = time.perf_counter()
                with con.cursor() as cur, cur.copy(
                        f"COPY bare_{TABLE} ({cols}) FROM STDIN WITH (FORMAT {fmt})") as cp:
                    view = memoryview(data)
                    for i in range(0, len(view), 1 << 20):
                        cp.write(view[i:i + (1 << 20)])
                con.commit()
                return time.perf_counter() - t0

        store_s, bare_s, bare_csv_s, stages = [], [], [], []
        for r in range(repeat):
            with pg_connect(url) as con:
                con.execute(f"TRUNCATE {TABLE}, bare_{TABLE}")
                con.execute("CHECKPOINT")
            # store.write: the full public path
            st = _pg_stage_timers()
            t0 = time.perf_counter()
            try:
                written = store.write(TABLE, df)
            finally:
                wall = time.perf_counter() - t0
                st.restore()
            assert written == n
            store_s.append(wall)
            stages.append((st, wall))
            # bare psycopg COPY of the store's bytes (binary), then of the rows as CSV
            bare_s.append(bare_copy(binary, "binary"))
            with pg_connect(url) as con:
                a = con.execute(f"SELECT count(*), sum(healpix29 % 1000003), sum(dia_source_id) FROM {TABLE}").fetchone()
                b = con.execute(f"SELECT count(*), sum(healpix29 % 1000003), sum(dia_source_id) FROM bare_{TABLE}").fetchone()
                assert a == b, f"store and bare tables differ: {a} vs {b}"
                con.execute(f"TRUNCATE bare_{TABLE}")
                con.execute("CHECKPOINT")
            bare_csv_s.append(bare_copy(csv, "csv"))
            print(f"  run {r + 1}/{repeat}: store.write {store_s[-1]:.2f} s, bare binary COPY {bare_s[-1]:.2f} s, "
                  f"bare CSV COPY {bare_csv_s[-1]:.2f} s")
        with pg_connect(url) as con:
            a = con.execute(f"SELECT count(*), sum(healpix29 % 1000003), sum(dia_source_id) FROM {TABLE}").fetchone()
            b = con.execute(f"SELECT count(*), sum(healpix29 % 1000003), sum(dia_source_id) FROM bare_{TABLE}").fetchone()
        assert a == b, f"store and bare tables differ: {a} vs {b}"
        print(f"  check: both tables hold {a[0]} rows with equal checksums")
        store.close()
    i = int(np.argsort(store_s)[len(store_s) // 2])
    out.update(store_s=float(np.median(store_s)), bare_s=float(np.median(bare_s)), csv_s=csv_s,
               bare_csv_s=float(np.median(bare_csv_s)), bin_s=bin_s, stages=stages[i])
    return out


def bench_parquet(df, df2) -> dict:
    import pyarrow.parquet as pq

    from archive.catalog.backends import open_store
    from archive.catalog.validate import conform

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="archive-bench-write-") as tmp:
        store = open_store(str(pathlib.Path(tmp) / "arc"), create=True)
        conformed = conform(store.schema[TABLE], df)
        t0 = time.perf_counter()
        pq.write_table(conformed.sort_by("healpix29"), pathlib.Path(tmp) / "bare.parquet",
                       row_group_size=32_768, compression="zstd")
        out["bare_s"] = time.perf_counter() - t0
        for key, data in (("first", df), ("second", df2)):
            st = _pq_stage_timers()
            t0 = time.perf_counter()
            try:
                store.write(TABLE, data)
            finally:
                wall = time.perf_counter() - t0
                st.restore()
            nfiles = len(store.manifest()["tables"][TABLE]["files"])
            out[key] = (wall, st, nfiles)
            print(f"  parquet {key} batch: {wall:.2f} s, {nfiles} files in the table")
        assert store.count(TABLE) == len(df) + len(df2)
        store.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="rows per batch (default 1,000,000)")
    p.add_argument("--repeat", type=int, default=3, help="Postgres repetitions (median reported)")
    p.add_argument("--layout", choices=["fullsky", "dense"], default="fullsky",
                   help="positions: uniform over the full sky (default) or a 10x10 deg region")
    p.add_argument("--skip-postgres", action="store_true")
    p.add_argument("--skip-parquet", action="store_true")
    args = p.parse_args(argv)
    n = args.rows

    print(f"# bench_write  rows={n} layout={args.layout} git={git_rev()}")
    print(f"# {machine_line()}")
    t0 = time.perf_counter()
    df = make_dia_sources(n, seed=1, layout=args.layout)
    print(f"generated {n} rows x {df.shape[1]} columns in {time.perf_counter() - t0:.2f} s")

    pg = pq_ = None
    if not args.skip_postgres:
        print("\n== PostgreSQL ==")
        pg = bench_postgres(df, args.repeat)
    if not args.skip_parquet:
        print("\n== Parquet ==")
        df2 = make_dia_sources(n, seed=2, layout=args.layout, start_id=n + 1)
        pq_ = bench_parquet(df, df2)

    print("\n== Results ==")
    print(f"{'path':<56s} {'seconds':>8s} {'rows/s':>10s} {'vs bare COPY':>13s}")
    if pg:
        rows = [("postgres store.write (validate+sort+encode+COPY+commit)", pg["store_s"]),
                ("bare psycopg COPY, binary pre-encoded (store's bytes)", pg["bare_s"]),
                ("bare sort + binary encode + psycopg COPY", pg["bare_s"] + pg["bin_s"]),
                ("bare psycopg COPY, CSV pre-encoded", pg["bare_csv_s"]),
                ("bare CSV encode + psycopg COPY", pg["bare_csv_s"] + pg["csv_s"])]
        for label, s in rows:
            print(f"{label:<56s} {s:8.2f} {n / s:10.0f} {s / pg['bare_s']:12.2f}x")
        ratio = pg["store_s"] / pg["bare_s"]
        print(f"postgres store / bare COPY = {ratio:.2f}x  (goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})"
              f"; store / bare CSV COPY = {pg['store_s'] / pg['bare_csv_s']:.2f}x"
              f"  [PostgreSQL {pg['server']}, median of {args.repeat}]")
        st, wall = pg["stages"]
        print(f"  stage break-down of the median store.write ({wall:.2f} s):")
        _print_stages(st, wall)
    if pq_:
        ref = pg["bare_s"] if pg else None
        for key in ("first", "second"):
            wall, st, nfiles = pq_[key]
            vs = f"{wall / ref:12.2f}x" if ref else ""
            label = f"parquet store.write, {key} batch ({'empty' if key == 'first' else 'non-empty'} store)"
            print(f"{label:<52s} {wall:8.2f} {n / wall:10.0f} {vs}")
        print(f"{'bare pq.write_table, one sorted file':<52s} {pq_['bare_s']:8.2f} {n / pq_['bare_s']:10.0f}")
        for key in ("first", "second"):
            wall, st, nfiles = pq_[key]
            print(f"  stage break-down, parquet {key} batch ({wall:.2f} s, {nfiles} files after):")
            _print_stages(st, wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
