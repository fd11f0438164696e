"""Cone-search benchmark: the store's two backends beside Q3C on the same rows.

Loads ``--rows`` (default 10,000,000) random ``dia_source`` rows, generated
vectorised and seeded in batches of ``--batch`` (default 1,000,000), into

* a Postgres store in a freshly created database (``store.write``: validation +
  sort by healpix29 + binary COPY, one transaction per batch), then ``ANALYZE``;
* a Q3C table in the same database: ``CREATE TABLE q3c_dia_source AS SELECT *
  FROM dia_source`` (the same rows, every column), ``q3c_ang2ipix(ra, dec)``
  index, ``CLUSTER``, ``ANALYZE``;
* a Parquet store in a temporary directory (``store.write``, one transaction per
  ``--parquet-batch`` rows, default = ``--batch``).

Then, at seeded random centres drawn over the area the rows cover, it times
``--n-small`` (1,000) cones of 2 arcsec and ``--n-large`` (100) cones of
1 arcmin: ``store.cone("dia_source", ra, dec, r)`` on both backends (the full
public path, returning a DataFrame) and ``q3c_radial_query`` through psycopg
(execute + fetchall of every column: the lower bound of any Python client).
Each cone runs once per engine, interleaved, after a warm-up of 20 cones.
For every cone the row counts of each backend must equal Q3C's; mismatches
are printed with the ids that differ and their distances.

Layouts (``--layout``): ``fullsky`` spreads the rows uniformly over the sphere
(~240 rows/deg^2 at 10M: most 2" cones are empty and a 1' cone holds ~0.2
rows, so it measures the fixed cost of a query on a large table); ``dense``
puts them uniformly in a 10x10 deg field (~100,000 rows/deg^2, like a deep
survey field: a 1' cone returns ~90 rows, a 2" cone ~0.1), so it also
measures fetching rows.

The database is dropped and the temporary directory removed at the end.

Q3C must be installed for PostgreSQL 15: ``apt-get install -y postgresql-15-q3c``.

Run:  python bench/bench_cone.py --layout dense [--rows 10000000]
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
    layout_area_deg2,
    machine_line,
    make_dia_sources,
    percentiles_ms,
    pg_connect,
    pg_version,
    random_positions,
)

TABLE = "dia_source"
Q3C_TABLE = "q3c_dia_source"
Q3C_HELP = ("Q3C is not available in this PostgreSQL server. Install it with\n"
            "    apt-get update && apt-get install -y postgresql-15-q3c\n"
            "(or build https://github.com/segasai/q3c against the server's pg_config), then rerun.")


def check_q3c(url: str) -> str:
    """CREATE EXTENSION q3c in the benchmark database; exit with instructions if it fails."""
    import psycopg

    try:
        with pg_connect(url) as con:
            con.execute("CREATE EXTENSION IF NOT EXISTS q3c")
            return con.execute("SELECT q3c_version()").fetchone()[0]
    except psycopg.Error as exc:
        print(f"CREATE EXTENSION q3c failed: {str(exc).strip().splitlines()[0]}\n{Q3C_HELP}", file=sys.stderr)
        raise SystemExit(2) from None


#: Rows are generated in chunks of this size, chunk i with seed ``seed + i``, so
#: that every backend gets exactly the same rows whatever its write batch size.
GEN_CHUNK = 1_000_000


def batches(rows: int, batch: int, layout: str, seed: int):
    """Yield (start offset, DataFrame) write batches of ``batch`` rows cut from the
    same seeded row sequence (ids 1..rows), independent of ``batch``."""
    import pandas as pd

    pending, start = [], 0
    for i, chunk_start in enumerate(range(0, rows, GEN_CHUNK)):
        n = min(GEN_CHUNK, rows - chunk_start)
        pending.append(make_dia_sources(n, seed=seed + i, layout=layout, start_id=chunk_start + 1))
        have = sum(len(d) for d in pending)
        while have >= batch or (chunk_start + n == rows and have):
            df = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
            out, rest = df.iloc[:batch].reset_index(drop=True), df.iloc[batch:].reset_index(drop=True)
            yield start, out
            start += len(out)
            pending = [rest] if len(rest) else []
            have = len(rest)


def load_postgres(url: str, args) -> dict:
    from archive.catalog.backends import open_store

    info = {}
    store = open_store(url, create=True)
    t0 = time.perf_counter()
    for start, df in batches(args.rows, args.batch, args.layout, args.seed):
        t1 = time.perf_counter()
        store.write(TABLE, df)
        print(f"  postgres: rows {start + 1}..{start + len(df)} written in {time.perf_counter() - t1:.1f} s",
              flush=True)
    info["load_s"] = time.perf_counter() - t0
    with pg_connect(url) as con:
        t0 = time.perf_counter()
        con.execute(f"ANALYZE {TABLE}")
        if args.cluster_store:
            con.execute(f"CLUSTER {TABLE} USING ix_{TABLE}_healpix29")
            con.execute(f"ANALYZE {TABLE}")
        info["analyze_s"] = time.perf_counter() - t0
        info["size"] = con.execute(f"SELECT pg_size_pretty(pg_total_relation_size('{TABLE}'))").fetchone()[0]
    print(f"  postgres store: {args.rows} rows in {info['load_s']:.1f} s "
          f"({args.rows / info['load_s']:.0f} rows/s), ANALYZE{' + CLUSTER' * args.cluster_store} "
          f"{info['analyze_s']:.1f} s, {info['size']} with indexes", flush=True)
    store.close()
    return info


def load_q3c(url: str) -> dict:
    info = {}
    with pg_connect(url) as con:
        t0 = time.perf_counter()
        con.execute(f"CREATE TABLE {Q3C_TABLE} AS SELECT * FROM {TABLE}")
        t1 = time.perf_counter()
        con.execute(f"CREATE INDEX {Q3C_TABLE}_q3c ON {Q3C_TABLE} (q3c_ang2ipix(ra, dec))")
        t2 = time.perf_counter()
        con.execute(f"CLUSTER {Q3C_TABLE} USING {Q3C_TABLE}_q3c")
        con.execute(f"ANALYZE {Q3C_TABLE}")
        t3 = time.perf_counter()
        info.update(copy_s=t1 - t0, index_s=t2 - t1, cluster_s=t3 - t2)
        info["size"] = con.execute(f"SELECT pg_size_pretty(pg_total_relation_size('{Q3C_TABLE}'))").fetchone()[0]
    print(f"  q3c: table copy {info['copy_s']:.1f} s, q3c_ang2ipix index {info['index_s']:.1f} s, "
          f"CLUSTER + ANALYZE {info['cluster_s']:.1f} s, {info['size']} with index", flush=True)
    return info


def load_parquet(root: pathlib.Path, args):
    from archive.catalog.backends import open_store

    store = open_store(str(root), create=True, order=args.parquet_order)
    t0 = time.perf_counter()
    for start, df in batches(args.rows, args.parquet_batch, args.layout, args.seed):
        t1 = time.perf_counter()
        store.write(TABLE, df)
        print(f"  parquet: rows {start + 1}..{start + len(df)} written in {time.perf_counter() - t1:.1f} s",
              flush=True)
    load_s = time.perf_counter() - t0
    m = store.manifest()
    nfiles = len(m["tables"][TABLE]["files"])
    mbytes = (root / "manifest.json").stat().st_size / 1e6
    nparts = len({v["npix"] for v in m["tables"][TABLE]["files"].values()})
    print(f"  parquet store: {args.rows} rows in {load_s:.1f} s ({args.rows / load_s:.0f} rows/s), "
          f"{nfiles} files in {nparts} order-{store.order} partitions, manifest.json {mbytes:.1f} MB",
          flush=True)
    return store, {"load_s": load_s, "files": nfiles, "partitions": nparts, "manifest_mb": mbytes}


def q3c_cone(cur, ra: float, dec: float, radius_arcsec: float) -> list:
    cur.execute(f"SELECT * FROM {Q3C_TABLE} WHERE q3c_radial_query(ra, dec, %s, %s, %s)",
                (ra, dec, radius_arcsec / 3600.0), prepare=True)
    return cur.fetchall()


def _discard(_value) -> None:
    """Timing-only steps return None (no row count to compare)."""
    return None


def run_cones(engines: dict, ras, decs, radius_arcsec: float, budget_s: float) -> tuple[dict, dict, list]:
    """Time every engine on every cone, interleaved in the same order for each cone.

    An engine whose total time on this set of cones passes ``budget_s`` is not
    run on the remaining cones (its statistics then cover the first cones only).
    Engines return rows (a DataFrame or a list of tuples whose first field is
    dia_source_id), or None for timing-only steps.
    Returns (times[name] = [s], counts[name] = {cone index: rows}, mismatches).
    """
    times = {k: [] for k in engines}
    counts = {k: {} for k in engines}
    mismatches = []
    for i, (ra, dec) in enumerate(zip(ras, decs)):
        ids = {}
        for name, fn in engines.items():
            if sum(times[name]) > budget_s:
                continue
            t0 = time.perf_counter()
            res = fn(float(ra), float(dec), radius_arcsec)
            times[name].append(time.perf_counter() - t0)
            if res is None:
                continue
            counts[name][i] = len(res)
            if hasattr(res, "columns"):
                ids[name] = set(res["dia_source_id"].tolist())
            else:
                ids[name] = {int(r[0]) for r in res}
        for name in ids:
            if name != "q3c" and counts[name][i] != counts["q3c"][i]:
                mismatches.append((i, float(ra), float(dec), name, counts[name][i], counts["q3c"][i],
                                   sorted(ids[name] ^ ids["q3c"])[:5]))
    return times, counts, mismatches


def _breakdown(fn, timers, args) -> list[str]:
    """Run ``fn`` on the 1-arcmin cones with ``timers`` installed; lines of per-cone stage costs."""
    ras, decs = random_positions(min(args.n_large, 20), args.seed + 60, args.layout)
    t0 = time.perf_counter()
    try:
        for ra, dec in zip(ras, decs):
            fn(float(ra), float(dec), 60.0)
    finally:
        wall = time.perf_counter() - t0
        timers.restore()
    n = len(ras)
    return [f"      {label:<40s} {1e3 * sec / n:8.2f} ms/cone  {100 * share:5.1f} %  {calls / n:6.1f} calls/cone"
            for label, sec, share, calls in timers.report(wall)] + [f"      {'total':<40s} {1e3 * wall / n:8.2f} ms/cone"]


def parquet_breakdown(store, args) -> list[str]:
    """Where a Parquet cone's time goes (1-arcmin cones)."""
    import pyarrow.parquet as pq

    from archive.catalog import parquet_store
    from archive.sky import regions

    st = StageTimers()
    st.wrap(parquet_store.ParquetStore, "manifest", "manifest.json read + parse")
    st.wrap(regions.Cone, "pixel_ranges", "HEALPix covering (pixel_ranges)")
    st.wrap(pq, "read_table", "pq.read_table (one call per file)")
    if hasattr(parquet_store, "frame_from_arrow"):
        st.wrap(parquet_store, "frame_from_arrow", "Arrow -> pandas")
    return _breakdown(lambda ra, dec, r: store.cone(TABLE, ra, dec, r), st, args)


def postgres_breakdown(store, args) -> list[str]:
    """Where a Postgres store.cone's time goes (1-arcmin cones)."""
    from archive.catalog import postgres_store
    from archive.sky import regions

    st = StageTimers()
    st.wrap(regions.Cone, "pixel_ranges", "HEALPix covering (pixel_ranges)")
    # reads: a pool of autocommit connections (no pre-ping) since the client-overhead fix;
    # before it, engine.connect with pool_pre_ping
    reader = getattr(store, "_reader", None)
    if reader is not None:
        st.wrap(reader, "raw_connection", "pool checkout")
    else:
        st.wrap(store.engine, "connect", "pool checkout (+ pre-ping)")
    for attr, label in (("_binary_columns", "SQL + binary fetch (_binary_columns)"),
                        ("_copy_arrow", "SQL + COPY csv -> Arrow (_copy_arrow)"),
                        ("_fetch", "SQL + fetch + DataFrame (_fetch)"),
                        ("_rows_to_frame", "rows -> DataFrame (_rows_to_frame)"),
                        ("cone_distance_arcsec", "distances (cone_distance_arcsec)"),
                        ("nearest_first", "distance + sort on Arrow (nearest_first)"),
                        ("frame_from_arrow", "Arrow -> pandas (frame_from_arrow)")):
        if hasattr(postgres_store, attr):  # the store's fetch steps (names changed over time)
            st.wrap(postgres_store, attr, label)
    return _breakdown(lambda ra, dec, r: store.cone(TABLE, ra, dec, r), st, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--batch", type=int, default=1_000_000, help="rows per store.write on Postgres")
    p.add_argument("--parquet-batch", type=int, default=None,
                   help="rows per store.write on Parquet (default: --batch)")
    p.add_argument("--parquet-order", type=int, default=5, help="Parquet partition order (store default 5)")
    p.add_argument("--layout", choices=["fullsky", "dense"], default="dense")
    p.add_argument("--n-small", type=int, default=1000, help="number of 2 arcsec cones")
    p.add_argument("--n-large", type=int, default=100, help="number of 1 arcmin cones")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cluster-store", action="store_true",
                   help="also CLUSTER the store's Postgres table on healpix29 (off: as the store leaves it)")
    p.add_argument("--skip-parquet", action="store_true")
    p.add_argument("--compact", action="store_true",
                   help="also load a second Parquet store and compact it (ParquetStore.compact) before querying")
    p.add_argument("--budget", type=float, default=45.0,
                   help="seconds per engine per cone size; an engine past it skips the remaining cones")
    args = p.parse_args(argv)
    args.parquet_batch = args.parquet_batch or args.batch

    density = args.rows / layout_area_deg2(args.layout)
    print(f"# bench_cone  rows={args.rows} layout={args.layout} ({layout_area_deg2(args.layout):.0f} deg^2, "
          f"{density:.0f} rows/deg^2) batch={args.batch} parquet_batch={args.parquet_batch} "
          f"parquet_order={args.parquet_order} git={git_rev()}")
    print(f"# {machine_line()}", flush=True)

    import sqlalchemy as sa

    from archive.catalog.backends import open_store
    from archive.sky.regions import Cone

    results = {}
    breakdown = pg_breakdown = plans = None
    with fresh_database("archive_bench_cone") as url, \
            tempfile.TemporaryDirectory(prefix="archive-bench-cone-") as tmp:
        q3c_version = check_q3c(url)
        print(f"# PostgreSQL {pg_version(url)}, Q3C {q3c_version}", flush=True)
        print("\n== Loading ==", flush=True)
        pg_info = load_postgres(url, args)
        q3c_info = load_q3c(url)
        pq_store, pq_info = (None, None) if args.skip_parquet else load_parquet(pathlib.Path(tmp) / "arc", args)
        pq_compact = None
        if args.compact and pq_store is not None:
            pq_compact, cinfo = load_parquet(pathlib.Path(tmp) / "arc-compacted", args)
            t0 = time.perf_counter()
            removed = pq_compact.compact([TABLE])
            pq_info["compact_s"] = time.perf_counter() - t0
            pq_info["compact_files"] = len(pq_compact.manifest()["tables"][TABLE]["files"])
            print(f"  parquet (second copy) compacted in {pq_info['compact_s']:.1f} s: {removed} file(s) removed, "
                  f"{pq_info['compact_files']} left", flush=True)

        pg_store = open_store(url)
        t = pg_store.table(TABLE)
        cols = t.column_names  # dia_source_id first
        con = pg_connect(url)
        cur = con.cursor()
        sa_con = pg_store.engine.connect()

        def pg_sql_text(ra, dec, r, variant="store"):
            """The store's SQL (covering + range scans + haversine) and its parameters;
            ``variant`` applies one of the fixes proposed in bench/README.md."""
            region = Cone(ra, dec, r / 3600.0)
            sql, params = pg_store._region_sql(t, region, cols)
            if variant == "offset0":
                fenced = sql.replace("AND x.healpix29 < r.hi)", "AND x.healpix29 < r.hi OFFSET 0)")
                if fenced == sql:
                    raise RuntimeError("store SQL changed; update the OFFSET 0 variant of the benchmark")
                sql = fenced
            elif variant == "literal":
                ranges = region.pixel_ranges(region.default_order())
                where = " OR ".join(f"(healpix29 >= {int(lo)} AND healpix29 < {int(hi)})" for lo, hi in ranges)
                sql = (f"SELECT * FROM (SELECT {', '.join(f'x.{chr(34)}{c}{chr(34)}' for c in cols)} "
                       f"FROM {TABLE} x WHERE {where or 'false'}) t" + sql[sql.index(" WHERE 2 * asin"):])
            return sql, params

        def pg_sql(ra, dec, r, variant="store"):
            """Run :func:`pg_sql_text` on one open connection, no DataFrame."""
            sql, params = pg_sql_text(ra, dec, r, variant)
            return sa_con.execute(sa.text(sql), params).fetchall()

        def explain(ra, dec, r) -> list[str]:
            """EXPLAIN ANALYZE of each SQL variant and of Q3C for one cone (plan shape, JIT, time)."""
            out = []
            for variant in variants:
                sql, params = pg_sql_text(ra, dec, r, variant)
                plan = [row[0] for row in sa_con.execute(sa.text("EXPLAIN (ANALYZE) " + sql), params)]
                out.append(f"    -- {variant} SQL:")
                out += [f"      {ln[:150]}" for ln in plan if "->" in ln or not ln.startswith(" ")
                        or "JIT" in ln or "Timing" in ln][:16]
            cur.execute(f"EXPLAIN (ANALYZE) SELECT * FROM {Q3C_TABLE} WHERE q3c_radial_query(ra, dec, %s, %s, %s)",
                        (ra, dec, r / 3600.0))
            out.append("    -- q3c:")
            out += [f"      {row[0][:150]}" for row in cur.fetchall()
                    if "->" in row[0] or not row[0].startswith(" ") or "JIT" in row[0]][:16]
            return out

        engines = {"q3c": lambda ra, dec, r: q3c_cone(cur, ra, dec, r),
                   "postgres store.cone": lambda ra, dec, r: pg_store.cone(TABLE, ra, dec, r),
                   # the same cone again at once: its heap pages are now in shared_buffers,
                   # so the difference to the first call is the cost of reaching scattered rows
                   "postgres, same cone again": lambda ra, dec, r: pg_store.cone(TABLE, ra, dec, r)}
        if pq_store is not None:
            engines["parquet store.cone"] = lambda ra, dec, r: pq_store.cone(TABLE, ra, dec, r)
        if pq_compact is not None:
            engines["parquet, compacted"] = lambda ra, dec, r: pq_compact.cone(TABLE, ra, dec, r)
        engines["pg store SQL only"] = pg_sql
        # The store's SQL before the fix of bench/README finding 1 used unnest + LATERAL;
        # for that form also time the two proposed fixes.
        lateral = "JOIN LATERAL" in pg_sql_text(10.0, 10.0, 60.0)[0]
        variants = ["store"] + (["offset0", "literal"] if lateral else [])
        if lateral:
            engines["pg SQL fix: OFFSET 0"] = lambda ra, dec, r: pg_sql(ra, dec, r, "offset0")
            engines["pg SQL fix: literal OR"] = lambda ra, dec, r: pg_sql(ra, dec, r, "literal")
        engines["covering only"] = lambda ra, dec, r: _discard(Cone(ra, dec, r / 3600.0).pixel_ranges())
        if pq_store is not None:
            engines["parquet manifest read"] = lambda ra, dec, r: _discard(pq_store.manifest())

        print("\n== Queries ==", flush=True)
        wra, wdec = random_positions(20, args.seed + 999, args.layout)
        run_cones(engines, wra, wdec, 60.0, args.budget)  # warm-up, not measured
        for label, n, radius in (("2 arcsec", args.n_small, 2.0), ("1 arcmin", args.n_large, 60.0)):
            ras, decs = random_positions(n, args.seed + int(radius), args.layout)
            t0 = time.perf_counter()
            times, counts, mism = run_cones(engines, ras, decs, radius, args.budget)
            results[label] = (times, counts, mism)
            print(f"  {n} cones of {label}: {time.perf_counter() - t0:.1f} s; "
                  f"mean rows per cone (q3c) {np.mean(list(counts['q3c'].values())):.2f}; "
                  f"{len(mism)} count mismatch(es)", flush=True)
            for name, tt in times.items():
                if len(tt) < n:
                    print(f"    {name}: time budget {args.budget:.0f} s spent, measured on the first {len(tt)} cones")
            for i, ra, dec, name, got, want, diff in mism[:20]:
                print(f"    MISMATCH cone {i} ({ra:.6f}, {dec:.6f}) r={radius}\": {name} {got} rows, "
                      f"q3c {want}; ids in one only: {diff}")
        try:  # diagnostics must not cost the figures if the store's internals change
            plans = explain(float(ras[0]), float(decs[0]), 60.0)
            if pq_store is not None:
                breakdown = parquet_breakdown(pq_compact or pq_store, args)
            pg_breakdown = postgres_breakdown(pg_store, args)
        except Exception as exc:  # noqa: BLE001
            print(f"  (diagnostics failed: {type(exc).__name__}: {exc})", flush=True)
        sa_con.close()
        cur.close()
        con.close()
        pg_store.close()
        if pq_store is not None:
            pq_store.close()
        if pq_compact is not None:
            pq_compact.close()

    print("\n== Results ==")
    print(f"rows={args.rows} layout={args.layout} ({density:.0f} rows/deg^2); latency in ms; "
          f"ratio = median / Q3C median; n = cones measured; rows = mean rows per cone")
    hdr = f"{'engine':<24s}"
    for label in results:
        hdr += f" | {label + ' median':>16s} {'p95':>8s} {'ratio':>7s} {'n':>5s} {'rows':>6s}"
    print(hdr)
    for name in results["2 arcsec"][0]:
        line = f"{name:<24s}"
        for label, (times, counts, _) in results.items():
            med, p95, _ = percentiles_ms(times[name])
            qmed = percentiles_ms(times["q3c"])[0]
            rows = f"{np.mean(list(counts[name].values())):6.2f}" if counts[name] else f"{'':6s}"
            line += f" | {med:16.2f} {p95:8.2f} {med / qmed:7.2f} {len(times[name]):5d} {rows}"
        print(line)
    for label, (times, counts, mism) in results.items():
        agree = ", ".join(f"{k} {sum(1 for i, c in counts[k].items() if c == counts['q3c'][i])}/{len(counts[k])}"
                          for k in counts if k != "q3c" and counts[k])
        print(f"correctness {label}: cones whose row count equals Q3C's: {agree}")
    print(f"load: postgres store {pg_info['load_s']:.0f} s ({args.rows / pg_info['load_s']:.0f} rows/s); "
          f"q3c table copy+index+cluster {q3c_info['copy_s'] + q3c_info['index_s'] + q3c_info['cluster_s']:.0f} s"
          + (f"; parquet {pq_info['load_s']:.0f} s ({args.rows / pq_info['load_s']:.0f} rows/s, "
             f"{pq_info['files']} files, manifest {pq_info['manifest_mb']:.1f} MB)" if pq_info else "")
          + (f"; compaction of a second copy {pq_info['compact_s']:.0f} s -> {pq_info['compact_files']} files"
             if pq_info and "compact_s" in pq_info else ""))
    for title, lines in (("parquet store.cone", breakdown), ("postgres store.cone", pg_breakdown)):
        if lines:
            print(f"  break-down of {title}{' (compacted copy)' * (title.startswith('parquet') and args.compact)} on the first {min(args.n_large, 20)} 1-arcmin cones:")
            print("\n".join(lines))
    if plans:
        print("  query plans for the first 1-arcmin cone (EXPLAIN ANALYZE, abridged):")
        print("\n".join(plans))
    bad = sum(len(m) for _, _, m in results.values())
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
