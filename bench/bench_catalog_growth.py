"""Catalog growth per survey night on each backend, and association time at 10^8 DIAObjects.

``--rows`` (rows and bytes):

1. Runs ``archive demo``'s chain (``--size``, ``--epochs``, 2 jobs) on the embedded store and
   counts the rows of every table: per raw exposure (bookkeeping tables: exposure, input
   files, products, units, provenance; scaled per CCD-exposure), or per Mpx of a processed
   exposure (source) or of a difference image (dia_source, dia_object versions,
   dia_forced_source; scaled by pixel count).
2. Bytes per row on each backend: the demo's own rows of each table, resampled to
   ``--rows-per-table`` rows (new ids, every float multiplied by 1 + 1e-4 N(0,1) so values
   stay realistic but do not repeat, healpix29 recomputed), appended in transactions of
   ``--batch`` rows (about a visit's worth) to an empty Parquet store (bytes = growth of the
   table's files, margin catalog included) and an empty Postgres database
   (``pg_total_relation_size`` after VACUUM ANALYZE: heap + TOAST + indexes).
3. Rows and bytes per night for ZTF (~700 exposures x 16 CCDs of 6k x 6k) and LSST (~1,000
   visits x 189 CCDs of 4k x 4k), scaled by pixel count from the demo's rows per Mpx.

``--association N [N ...]`` (association time against a growing store): for each N and
backend, bench/bench_association_e2e.py's load and visits (N synthetic 186-column DIAObjects
at ``--density`` per deg^2, then 10k-source visits through ``ingest_dia_sources``); median
seconds per visit; fits t = a + b log10 N and t = c N^k to the medians and extrapolates to
10^8 (and scales by each survey's DIASources per visit for a night's association time).

    python bench/bench_catalog_growth.py --rows --size 1024 --epochs 6
    python bench/bench_catalog_growth.py --association 1e5 1e6 1e7 --backends postgres parquet
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fresh_database, git_rev, machine_line, pg_connect  # noqa: E402

# CCD-exposures per night, pixels per CCD (as bench_chain.py)
SURVEYS = {"ZTF": (700 * 16, 6144 * 6144), "LSST": (1000 * 189, 4096 * 4096)}
VISITS = {"ZTF": 700, "LSST": 1000}
# on paper: field of view (deg^2: 16 x 6144^2 px at 1.01", 189 x 4096^2 px at 0.2") and survey area (deg^2)
FOV = {"ZTF": 16 * (6144 * 1.01 / 3600) ** 2, "LSST": 189 * (4096 * 0.2 / 3600) ** 2}
AREA = {"ZTF": 30_000.0, "LSST": 18_000.0}
# what a table's rows grow with in the demo (the rest: once per tile, or per run): per CCD-exposure
# (rows per raw exposure, not per pixel; includes the demo's calibration frames and tile products),
# or per pixel of a processed exposure or of a difference image
PER_RAW = ("exposure", "input_file", "image_product", "pipeline_unit", "provenance")
PER_PROCESSED = ("source",)
PER_DIFF = ("dia_source", "dia_object", "dia_forced_source")


def demo_rows(size: int, epochs: int, seed: int, workdir: str) -> tuple[dict, dict, dict]:
    """Run the demo; return ({table: rows}, {table: demo DataFrame}, {raw, processed, diff})."""
    from archive.api import Archive
    from archive.catalog.schema import load_schema
    from archive.demo import run_demo

    rep = run_demo(os.path.join(workdir, "demo"), epochs=epochs, size=size, seed=seed, jobs=2, progress=False)
    counts, frames = {}, {}
    with Archive.open(rep.repo) as arc:
        for t in load_schema():
            counts[t.name] = int(arc.count(t.name))
            if counts[t.name]:
                frames[t.name] = arc.sql(f"SELECT * FROM {t.name}")
        units = {"raw": counts["exposure"],
                 "processed": int((rep.exposures["status"] == "processed").sum()),
                 "diff": int(arc.sql("SELECT count(*) AS n FROM image_product WHERE kind = 'diff'").iloc[0, 0])}
    return counts, frames, units


def resample(table, df: pd.DataFrame, n: int, rng) -> pd.DataFrame:
    """``n`` rows drawn from ``df``: ids new, floats jittered by 1e-4 relative, healpix29 dropped
    (the store derives it from the jittered ra/dec)."""
    out = df.iloc[rng.integers(0, len(df), n)].reset_index(drop=True)
    for c in out.columns:
        col = out[c]
        if c == "healpix29":
            continue
        if pd.api.types.is_integer_dtype(col) and c.endswith("_id"):
            new = (np.arange(1, n + 1, dtype=np.int64) if c == table.primary_key[0]
                   else rng.integers(1, 2**40, n))
            out[c] = pd.Series(new).where(col.notna().to_numpy()).astype(col.dtype)
        elif pd.api.types.is_float_dtype(col) and c not in ("ra", "dec"):
            out[c] = (col * (1 + 1e-4 * rng.standard_normal(n))).astype(col.dtype)
    if "ra" in out and "dec" in out:
        s = 1e-3 * rng.standard_normal((2, n))
        out["dec"] = np.clip(out["dec"].to_numpy() + s[1], -89.9, 89.9)
        out["ra"] = (out["ra"].to_numpy() + s[0]) % 360.0
        out = out.drop(columns=["healpix29"], errors="ignore")
    return out


def parquet_bytes(root: Path, table: str) -> int:
    """Bytes of a table's files in the Parquet store (its dataset and its margin collection)."""
    files = [*root.glob(f"{table}/**/*"), *root.glob(f"collections/{table}/**/*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def bytes_per_row(frames: dict, n_rows: int, batch: int, workdir: str, backends, seed: int) -> dict:
    """{(backend, table): bytes per row} from resampled demo rows."""
    from archive.catalog.backends import open_store
    from archive.catalog.validate import conform

    out = {}
    for backend in backends:
        with contextlib.ExitStack() as stack:
            if backend == "postgres":
                url = stack.enter_context(fresh_database("bench_growth"))
                store = open_store(url, create=True)
            else:
                url, root = None, Path(workdir) / "growth_parquet"
                store = open_store(str(root), create=True)
            stack.callback(store.close)
            for name, df in frames.items():
                table = store.table(name)
                rng = np.random.default_rng(seed)
                if url:
                    with pg_connect(url) as con:
                        before = con.execute(f"SELECT pg_total_relation_size('{name}')").fetchone()[0]
                else:
                    before = parquet_bytes(root, name)
                t0 = time.perf_counter()
                for i in range(0, n_rows, batch):
                    rows = resample(table, df, min(batch, n_rows - i), rng)
                    pk = table.primary_key[0]
                    if pk in rows and pd.api.types.is_integer_dtype(rows[pk]):
                        rows[pk] += i  # unique across batches
                    with store.transaction() as tx:
                        tx.append(name, conform(table, rows, "bench growth"), check_keys=False)
                t_write = time.perf_counter() - t0
                if url:
                    with pg_connect(url) as con:
                        con.execute(f"VACUUM (ANALYZE) {name}")
                        after, heap, idx = con.execute(
                            f"SELECT pg_total_relation_size('{name}'), pg_relation_size('{name}'), "
                            f"pg_indexes_size('{name}')").fetchone()
                    extra = f" (heap {heap / n_rows:.0f}, indexes {idx / n_rows:.0f})"
                else:
                    after, extra = parquet_bytes(root, name), ""
                out[(backend, name)] = (after - before) / n_rows
                print(f"  {backend:8s} {name:24s} {len(df.columns):4d} cols  {out[(backend, name)]:7.0f} B/row"
                      f"{extra}  (write {n_rows / t_write:,.0f} rows/s)", flush=True)
    return out


def night_table(counts: dict, units: dict, size: int, bpr: dict, backends) -> None:
    mpx = size * size / 1e6
    print(f"\nrows per unit in the demo ({size}^2 = {mpx:.2f} Mpx; {units['raw']} raw exposures, "
          f"{units['processed']} processed, {units['diff']} difference images):")
    hdr = " ".join(f"{b + ' B/row':>13s}" for b in backends)
    print(f"  {'table':24s} {'rows':>7s} {'per':>10s} {'rows/unit':>9s} {'rows/Mpx':>9s} {hdr}   "
          + "   ".join(f"{s} rows/night  " + " ".join(f"{b} GB/night" for b in backends) for s in SURVEYS))
    totals = {(s, b): 0.0 for s in SURVEYS for b in backends}
    rows_tot = dict.fromkeys(SURVEYS, 0.0)
    for name, n in counts.items():
        per = ("raw" if name in PER_RAW else "processed" if name in PER_PROCESSED
               else "diff" if name in PER_DIFF else None)
        b = " ".join(f"{bpr.get((bk, name), float('nan')):13.0f}" for bk in backends)
        if per is None:
            print(f"  {name:24s} {n:7d} {'tile/run':>10s} {'':>9s} {'':>9s} {b}   (not a nightly growth)")
            continue
        per_unit = n / max(units[per], 1)
        per_mpx = per_unit / mpx
        cells = []
        for s, (n_ccd, px) in SURVEYS.items():
            rows = per_unit * n_ccd if per == "raw" else per_mpx * n_ccd * px / 1e6
            rows_tot[s] += rows
            gb = []
            for bk in backends:
                v = rows * bpr.get((bk, name), float("nan")) / 1e9
                totals[(s, bk)] += v
                gb.append(f"{v:8.2f}")
            cells.append(f"{rows:14,.0f} " + " ".join(gb))
        mpx_cell = "" if per == "raw" else f"{per_mpx:.2f}"
        print(f"  {name:24s} {n:7d} {per:>10s} {per_unit:9.1f} {mpx_cell:>9s} {b}   " + "   ".join(cells))
    for s in SURVEYS:
        print(f"  {s} night total: {rows_tot[s]:,.0f} rows, "
              + ", ".join(f"{b} {totals[(s, b)]:.1f} GB" for b in backends))


def paper_forced(n_objects: float, bpr: dict, backends) -> None:
    """On paper: forced photometry at every DIAObject of the footprint on every visit, once the
    store holds ``n_objects`` spread over the survey area; each forced batch also writes a new
    dia_object version per object (dia_ingest.ingest_forced_sources)."""
    print(f"\non paper, at {n_objects:.0e} DIAObjects spread over the survey area (forced photometry at every "
          "DIAObject of each visit's footprint; one new dia_object version per forced row):")
    for s in SURVEYS:
        per_visit = n_objects / AREA[s] * FOV[s]
        night = per_visit * VISITS[s]
        gb = {b: night * (bpr.get((b, "dia_forced_source"), np.nan) + bpr.get((b, "dia_object"), np.nan)) / 1e9
              for b in backends}
        print(f"  {s}: {n_objects / AREA[s]:,.0f} objects/deg^2 x {FOV[s]:.1f} deg^2 = {per_visit:,.0f} forced rows "
              f"per visit, {night:,.0f} per night (+ as many dia_object versions): "
              + ", ".join(f"{b} {v:.0f} GB/night" for b, v in gb.items()))


# -- association against a growing store --------------------------------------------------
def association(sizes, backends, visits: int, density: float, workdir: str, seed: int) -> None:
    import bench_association_e2e as e2e

    ph = e2e.Phases()
    e2e.install_timers(ph)
    med = {}
    try:
        for backend in backends:
            for n in sizes:
                ns = argparse.Namespace(objects=n, sources=[1e4], visits=[visits], density=density,
                                        chunk=1_000_000, seed=seed, no_diagnostic=True, no_vacuum=False,
                                        reuse=None)
                t0 = time.perf_counter()
                rows, ok = e2e.run_backend(backend, ns, ph, workdir)
                if not ok:
                    raise SystemExit(f"{backend} {n:.0e}: checks failed")
                walls = [r["wall"] for r in rows]
                med[(backend, n)] = float(np.median(walls))
                print(f"## {backend} {int(n):>11,} objects: median {med[(backend, n)]:.3f} s per 10k-source visit "
                      f"({', '.join(f'{w:.2f}' for w in walls)}); whole run {time.perf_counter() - t0:.0f} s; "
                      f"load(1m) {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        ph.restore()
    print("\nassociation of a 10k-source visit vs stored DIAObjects (median s), and extrapolations:")
    for backend in backends:
        ns = np.array([n for b, n in med if b == backend], float)
        ts = np.array([med[(backend, n)] for n in ns])
        print(f"  {backend}: " + ", ".join(f"{n:.0e}: {t:.3f}" for n, t in zip(ns, ts)))
        if len(ns) < 2:
            continue
        b, a = np.polyfit(np.log10(ns), ts, 1)
        k, logc = np.polyfit(np.log10(ns), np.log10(ts), 1)
        lin, pw = a + b * 8, 10 ** (logc + k * 8)
        print(f"    t = {a:.3f} + {b:.3f} log10 N  -> 10^8: {lin:.3f} s;  t = c N^{k:.3f} -> 10^8: {pw:.3f} s")
        hi = max(lin, pw)
        for s in SURVEYS:
            print(f"    {s}: {VISITS[s]} visits x (DIASources per visit / 10k) x {hi:.2f} s = "
                  f"{VISITS[s] * hi / 3600:.2f} h per night per 10k DIASources per visit (the larger extrapolation)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", action="store_true", help="rows and bytes per night")
    ap.add_argument("--association", type=float, nargs="+", metavar="N", help="stored DIAObjects, e.g. 1e5 1e6 1e7")
    ap.add_argument("--backends", nargs="+", default=["parquet", "postgres"], choices=["parquet", "postgres"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rows-per-table", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=20_000, help="rows per transaction when sizing a backend")
    ap.add_argument("--visits", type=int, default=3, help="timed 10k-source visits per store size")
    ap.add_argument("--density", type=float, default=30_000.0, help="stored DIAObjects per deg^2")
    ap.add_argument("--objects-total", type=float, default=1e8, help="DIAObjects for the on-paper forced rows")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    print(f"# {machine_line()} commit={git_rev()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_growth_", dir=args.workdir) as work:
        if args.rows:
            t0 = time.perf_counter()
            counts, frames, units = demo_rows(args.size, args.epochs, args.seed, work)
            print(f"demo {args.size}^2 x {args.epochs} visits: {time.perf_counter() - t0:.0f} s; "
                  f"load(1m) {os.getloadavg()[0]:.2f}", flush=True)
            print(f"bytes per row ({args.rows_per_table:,} resampled demo rows per table, "
                  f"{args.batch:,} per transaction):")
            bpr = bytes_per_row(frames, args.rows_per_table, args.batch, work, args.backends, args.seed)
            night_table(counts, units, args.size, bpr, args.backends)
            paper_forced(args.objects_total, bpr, args.backends)
        if args.association:
            association(args.association, args.backends, args.visits, args.density, work, args.seed)
    print(f"# done; load(1m) {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
