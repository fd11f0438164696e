"""End-to-end association: one visit of DIASources through ``ingest_dia_sources`` on each backend.

Goal (issue 4): a 10k-source visit end to end on Postgres in under a second
with 10M objects stored.  What one visit does (archive/catalog/dia_ingest.py):
validate the batch, check its exposures are new, lock the footprint (Postgres),
read association's columns of the current DIAObjects of the footprint + margin
(an index-only scan of the partial covering index on Postgres), associate, read
all columns of the matched objects only, update the running-sum summaries,
close the touched objects' versions, append the new versions and the
DIASources, commit.

Stored objects: ``--objects`` DIAObjects (full 186-column ``dia_object`` rows
built by :func:`archive.catalog.summaries.new_objects` from 1 + Poisson(2)
synthetic DIASources each, so every sum, summary and extreme is consistent)
spread uniformly on the sphere over a square patch at (RA, Dec) = (150, +2)
whose area gives ``--density`` objects per deg^2 (default 30 000 / deg^2:
1M objects -> 33 deg^2, 10M -> 333 deg^2).  They are loaded through the
store's own ``transaction().append`` in chunks of ``--chunk`` rows (one
transaction each; the store sorts each chunk by healpix29); Postgres then runs
VACUUM (ANALYZE) -- what autovacuum does soon after a bulk load; it sets the
visibility map that lets the association read be index-only -- or only
ANALYZE with ``--no-vacuum``.

Visits: ``--visits`` visits of ``--sources`` DIASources each (every
``dia_source`` column filled, see bench/common.py), one band, one MJD,
189 detectors, inside a square footprint of ``sources / 10 000`` deg^2 (1 deg^2
for 10k, 10 deg^2 -- a full LSST focal plane -- for 100k) at a random place in
the patch, away from its edges.  70 % of the sources are re-detections of
stored objects of the footprint (0.1" scatter), 30 % are new.  One untimed
warm-up visit of 1 000 sources runs first (imports, caches).  Each visit gets
``ingest_mjd`` later than the previous one.

Timing: wall clock of ``ingest_dia_sources`` per visit and a break-down by
phase, measured by wrapping the functions it calls with ``time.perf_counter``
(no edit of archive/).  A phase is counted only when no other phase is
running (so phases add up; ``other`` is the rest of the wall time); the
``  of which`` rows are nested diagnostics, already inside their phase.

Checks: every visit reports n sources, roughly 70 % matched to stored objects;
at the end the number of current (open) ``dia_object`` versions must equal the
stored objects plus the new objects of all visits, and the number of
``dia_source`` rows the sources ingested.  The script exits 1 otherwise.

Usage::

    python bench/bench_association_e2e.py --objects 1e6                 # both backends
    python bench/bench_association_e2e.py --objects 1e7 --backends postgres
    python bench/bench_association_e2e.py --objects 1e6 --sources 1e4 1e5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import fresh_database, git_rev, machine_line, make_dia_sources, pg_connect, pg_version  # noqa: E402

from archive.catalog import dia_ingest, parquet_store, postgres_store  # noqa: E402
from archive.catalog.dia_ingest import AssociationConfig, ingest_dia_sources  # noqa: E402
from archive.catalog.backends import open_store  # noqa: E402
from archive.catalog.summaries import new_objects  # noqa: E402
from archive.catalog.validate import conform  # noqa: E402
from archive.sky.healpix import radec_to_healpix29  # noqa: E402

CENTRE = (150.0, 2.0)
BANDS = np.array(["u", "g", "r", "i", "z", "y"])
STORED_VALIDITY = 60000.0   # validity_start of the pre-loaded versions (MJD TAI)
VISIT_MJD0 = 60100.0        # observation MJD of the first visit
INGEST_MJD0 = 60200.0       # ingest_mjd of the first visit
log = logging.getLogger("bench_e2e")


# -- phase timers ---------------------------------------------------------------------------
class Phases:
    """Exclusive phase timers: a wrapped call counts only when no phase is running
    (so phases add up to <= wall); ``sub`` timers always count (nested diagnostics)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.sub: dict[str, float] = defaultdict(float)
        self._active = 0
        self._patched: list[tuple[object, str, object]] = []

    def wrap(self, owner, attr: str, label, sub: bool = False) -> None:
        """``label``: a string, or ``f(args) -> str`` to name the phase by the call's arguments."""
        original = getattr(owner, attr)
        me = self

        def timed(*args, **kwargs):
            name = label(args) if callable(label) else label
            if sub:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    me.sub[name] += time.perf_counter() - t0
            if me._active:
                return original(*args, **kwargs)
            me._active += 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                me.total[name] += time.perf_counter() - t0
                me._active -= 1

        self._patched.append((owner, attr, original))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        out = dict(self.total), dict(self.sub)
        self.total.clear()
        self.sub.clear()
        return out


PHASES = ["validate (conform)", "exposure check", "lock", "query region", "associate", "read matched objects",
          "summaries", "close versions", "write dia_object", "write dia_source", "commit"]


def install_timers(ph: Phases) -> None:
    ph.wrap(dia_ingest, "conform", "validate (conform)")
    ph.wrap(dia_ingest, "associate", "associate")
    ph.wrap(dia_ingest, "apply_sources", "summaries")
    ph.wrap(dia_ingest, "finalize", "summaries")
    for cls in (postgres_store.PostgresTransaction, parquet_store.ParquetTransaction):
        ph.wrap(cls, "select_in", "exposure check")
        ph.wrap(cls, "query_region", "query region")
        # all columns of the matched objects only (since the narrow association read)
        if hasattr(cls, "current_versions"):
            ph.wrap(cls, "current_versions", "read matched objects")
        ph.wrap(cls, "close_versions", "close versions")
        ph.wrap(cls, "append", lambda a: f"write {a[1]}")
        ph.wrap(cls, "commit", "commit")
    ph.wrap(postgres_store.PostgresTransaction, "lock_partitions", "lock")
    # nested diagnostics: the Postgres store's row reader and COPY encoder
    for attr, label in (("_copy_arrow", "pg: read rows (COPY TO csv -> Arrow)"),
                        ("arrow_to_copy_binary", "pg: Arrow -> binary COPY tuples"),
                        ("arrow_to_csv", "pg: Arrow -> CSV for COPY")):
        if hasattr(postgres_store, attr):
            ph.wrap(postgres_store, attr, label, sub=True)
    ph.wrap(parquet_store.ParquetTransaction, "delete", "pq: copy-on-write delete (rewrite files)", sub=True)
    ph.wrap(parquet_store.ParquetTransaction, "select_in", "pq: select_in (read files)", sub=True)


# -- data ---------------------------------------------------------------------------------
class Sky:
    """The square patch holding the stored objects (uniform on the sphere)."""

    def __init__(self, n_objects: int, density: float) -> None:
        self.area = n_objects / density  # deg^2
        # side s (deg) in RA and the Dec band with the same s: area = s * (sin d1 - sin d0) * 180/pi
        ra0, dec0 = CENTRE
        s = np.sqrt(self.area)
        for _ in range(20):
            band = np.degrees(np.sin(np.radians(dec0 + s / 2)) - np.sin(np.radians(dec0 - s / 2)))
            s = self.area / band
        self.side = s
        self.ra_lo, self.ra_hi = ra0 - s / 2, ra0 + s / 2
        self.dec_lo, self.dec_hi = dec0 - s / 2, dec0 + s / 2

    def uniform(self, n: int, rng, ra_lo=None, ra_hi=None, dec_lo=None, dec_hi=None):
        ra_lo = self.ra_lo if ra_lo is None else ra_lo
        ra_hi = self.ra_hi if ra_hi is None else ra_hi
        dec_lo = self.dec_lo if dec_lo is None else dec_lo
        dec_hi = self.dec_hi if dec_hi is None else dec_hi
        z = rng.uniform(np.sin(np.radians(dec_lo)), np.sin(np.radians(dec_hi)), n)
        return rng.uniform(ra_lo, ra_hi, n), np.degrees(np.arcsin(z))


def make_object_chunk(sky: Sky, n: int, first_id: int, seed: int) -> pd.DataFrame:
    """``n`` finalized dia_object rows (one open version each), from 1 + Poisson(2)
    synthetic DIASources per object in random bands at MJD 59000-60000."""
    rng = np.random.default_rng(seed)
    ra, dec = sky.uniform(n, rng)
    k = 1 + rng.poisson(2.0, n)
    m = int(k.sum())
    obj = np.repeat(np.arange(n), k)
    err = rng.uniform(0.03, 0.15, m) / 3600.0
    cosd = np.cos(np.radians(dec[obj]))
    flux0 = rng.lognormal(np.log(3000.0), 1.0, n)
    ferr = rng.uniform(80.0, 200.0, m)
    src = pd.DataFrame({
        "dia_object_id": np.arange(first_id, first_id + n, dtype=np.int64)[obj],
        "ra": (ra[obj] + rng.normal(0.0, 1.0, m) * err / cosd) % 360.0,
        "dec": dec[obj] + rng.normal(0.0, 1.0, m) * err,
        "ra_err": err / cosd, "dec_err": err,
        "mjd": rng.uniform(59000.0, 60000.0, m),
        "band": BANDS[rng.integers(0, BANDS.size, m)],
        "psf_flux": flux0[obj] * rng.lognormal(0.0, 0.2, m) + rng.normal(0.0, 1.0, m) * ferr,
        "psf_flux_err": ferr,
    })
    return new_objects(src, validity_start=STORED_VALIDITY)


def load_objects(store, sky: Sky, n_total: int, chunk: int, seed: int, analyze_url: str | None,
                 vacuum: bool = True):
    """Append the stored objects in chunks; return (ra, dec, id) of all of them and timings.

    Postgres: then ``VACUUM (ANALYZE)`` (``vacuum``) or only ``ANALYZE``.  VACUUM sets
    the visibility map, as autovacuum does on its own shortly after a bulk load; until
    then index-only scans (the association read) still visit the heap."""
    t_obj = store.table("dia_object")
    ras, decs, ids = [], [], []
    t_gen = t_write = 0.0
    done = 0
    c = 0
    while done < n_total:
        n = min(chunk, n_total - done)
        t0 = time.perf_counter()
        objs = make_object_chunk(sky, n, done + 1, seed + 1000 + c)
        arrow = conform(t_obj, objs, "bench dia_object chunk")
        t1 = time.perf_counter()
        with store.transaction() as tx:
            tx.append("dia_object", arrow, check_keys=False)
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_write += t2 - t1
        ras.append(objs["ra"].to_numpy())
        decs.append(objs["dec"].to_numpy())
        ids.append(objs["dia_object_id"].to_numpy())
        done += n
        c += 1
        print(f"#   loaded {done:>11,} objects  (generate {t_gen:7.1f} s, write {t_write:7.1f} s)", flush=True)
        del objs, arrow
    t_an = 0.0
    if analyze_url:
        t0 = time.perf_counter()
        with pg_connect(analyze_url) as con:
            con.execute("VACUUM (ANALYZE) dia_object" if vacuum else "ANALYZE dia_object")
        t_an = time.perf_counter() - t0
    return np.concatenate(ras), np.concatenate(decs), np.concatenate(ids), (t_gen, t_write, t_an)


def make_visit(sky: Sky, stored_ra, stored_dec, n: int, visit: int, seed: int,
               match_frac: float = 0.7) -> pd.DataFrame:
    """A visit of ``n`` dia_source rows in a square footprint of n/10 000 deg^2."""
    rng = np.random.default_rng(seed)
    side = np.sqrt(n / 10_000.0)
    margin = side / 2 + 0.2
    dec_c = rng.uniform(sky.dec_lo + margin, sky.dec_hi - margin)
    half_ra = side / 2 / np.cos(np.radians(dec_c))
    ra_c = rng.uniform(sky.ra_lo + half_ra + 0.2, sky.ra_hi - half_ra - 0.2)
    box = dict(ra_lo=ra_c - half_ra, ra_hi=ra_c + half_ra, dec_lo=dec_c - side / 2, dec_hi=dec_c + side / 2)
    inside = np.flatnonzero((stored_ra >= box["ra_lo"]) & (stored_ra < box["ra_hi"])
                            & (stored_dec >= box["dec_lo"]) & (stored_dec < box["dec_hi"]))
    n_old = min(int(round(match_frac * n)), inside.size)
    pick = rng.choice(inside, n_old, replace=False)
    s = 0.1 / 3600.0
    cosd = np.cos(np.radians(stored_dec[pick]))
    ra_o = stored_ra[pick] + rng.normal(0, s, n_old) / cosd
    dec_o = stored_dec[pick] + rng.normal(0, s, n_old)
    ra_n, dec_n = sky.uniform(n - n_old, rng, **box)
    df = make_dia_sources(n, seed=seed, layout="fullsky", start_id=10**12 + visit * 10**7)
    det = rng.integers(0, 189, n).astype(np.int32)
    err = (rng.uniform(0.03, 0.15, n) / 3600.0).astype(np.float32)
    df["ra"] = np.r_[ra_o, ra_n] % 360.0
    df["dec"] = np.r_[dec_o, dec_n]
    df["ra_err"] = (err / np.cos(np.radians(df["dec"].to_numpy()))).astype(np.float32)
    df["dec_err"] = err
    df["ra_dec_cov"] = np.float32(0.0)
    df["visit"] = np.int64(visit)
    df["detector"] = det
    df["exposure_id"] = np.int64(visit) * 1000 + det
    df["mjd"] = VISIT_MJD0 + visit * 0.001
    df["band"] = BANDS[visit % BANDS.size]
    return df


# -- the benchmark -------------------------------------------------------------------------
def open_backend(backend: str, workdir: str, stack: contextlib.ExitStack):
    if backend == "postgres":
        url = stack.enter_context(fresh_database("archive_bench_e2e"))
        store = open_store(url, create=True)
        stack.callback(store.close)
        return store, url
    root = os.path.join(workdir, "parquet_store")
    store = open_store(root, create=True)
    stack.callback(store.close)
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    return store, None


def pg_region_diagnostic(store, df: pd.DataFrame, cfg: AssociationConfig,
                         touched: np.ndarray) -> dict[str, float]:
    """After a visit (untimed in the table): read the visit's region (current dia_object
    versions) again, the way ingest did before the partial covering index (all 186 columns
    of every current object of the footprint) and the way it does now (association's
    columns through the index, then all columns of only the ``touched`` objects), and check
    the two agree on the region's objects."""
    from archive.catalog.dia_ingest import ASSOCIATION_COLUMNS
    from archive.sky.regions import PixelSet

    region = PixelSet.around(df["ra"].to_numpy(float), df["dec"].to_numpy(float), cfg.order())
    out: dict[str, float] = {}
    with store.transaction() as tx:
        t0 = time.perf_counter()
        ref = tx.query_region("dia_object", region, current_only=True)
        out["all columns of the region (before)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        narrow = tx.query_region("dia_object", region, columns=ASSOCIATION_COLUMNS, current_only=True)
        hp = narrow["healpix29"].to_numpy()[np.isin(narrow["dia_object_id"].to_numpy(), touched)]
        full = tx.current_versions("dia_object", touched, healpix29=hp)
        out["association columns + full rows of touched (now)"] = time.perf_counter() - t0
        tx.rollback()
    same = (len(narrow) == len(ref) and np.array_equal(np.sort(narrow["dia_object_id"].to_numpy()),
                                                       np.sort(ref["dia_object_id"].to_numpy())))
    if not same or len(full) != len(touched):
        raise RuntimeError(f"region diagnostic: narrow read {len(narrow)} rows (all columns {len(ref)}), "
                           f"touched {len(full)} of {len(touched)}")
    out["rows"] = float(len(ref))
    out["touched"] = float(len(touched))
    return out


def count_current(store, backend: str, url: str | None) -> tuple[int, int]:
    if backend == "postgres":
        with pg_connect(url) as con:
            n_obj = con.execute("SELECT count(*) FROM dia_object WHERE validity_end IS NULL").fetchone()[0]
            n_src = con.execute("SELECT count(*) FROM dia_source").fetchone()[0]
        return int(n_obj), int(n_src)
    n_obj = int(store.sql("SELECT count(*) AS n FROM dia_object WHERE validity_end IS NULL")["n"].iloc[0])
    return n_obj, store.count("dia_source")


def run_backend(backend: str, args, ph: Phases, workdir: str) -> tuple[list[dict], bool]:
    rows: list[dict] = []
    ok = True
    n_objects = int(args.objects)
    sky = Sky(n_objects, args.density)
    with contextlib.ExitStack() as stack:
        visit = 1
        n_new_total = n_src_total = 0
        if backend == "postgres" and args.reuse:
            # a database this script loaded before (with the same --objects/--density/--seed),
            # kept, e.g. after an interrupted run: read the current objects instead of reloading
            url = args.reuse
            store = open_store(url)
            stack.callback(store.close)
            with pg_connect(url) as con:
                cur = con.execute("SELECT dia_object_id, ra, dec FROM dia_object WHERE validity_end IS NULL")
                arr = np.array(cur.fetchall(), dtype=object)
                visit = int(con.execute("SELECT coalesce(max(visit), 0) FROM dia_source").fetchone()[0])
                n_src_total = -int(con.execute("SELECT count(*) FROM dia_source").fetchone()[0])
            ra_ids, ra, dec = arr[:, 0].astype(np.int64), arr[:, 1].astype(float), arr[:, 2].astype(float)
            n_new_total = len(ra_ids) - n_objects
            n_src_total = -n_src_total
            print(f"# postgres: reusing {url} ({len(ra_ids):,} current objects, last visit {visit}); "
                  "the database is NOT dropped", flush=True)
        else:
            store, url = open_backend(backend, workdir, stack)
            print(f"# {backend}: loading {n_objects:,} objects over {sky.area:.0f} deg^2 "
                  f"({sky.side:.2f} x {sky.side:.2f} deg) in chunks of {args.chunk:,}", flush=True)
            t0 = time.perf_counter()
            ra, dec, ra_ids, (t_gen, t_write, t_an) = load_objects(store, sky, n_objects, args.chunk,
                                                                   args.seed, url, not args.no_vacuum)
            t_load = time.perf_counter() - t0
            print(f"# {backend}: load {t_load:.1f} s (generate+conform {t_gen:.1f} s, write {t_write:.1f} s "
                  f"= {n_objects / t_write:,.0f} rows/s"
                  + (f", {'ANALYZE' if args.no_vacuum else 'VACUUM ANALYZE'} {t_an:.1f} s" if url else "")
                  + ")", flush=True)
        if backend == "postgres":
            with pg_connect(url) as con:
                size = con.execute("SELECT pg_size_pretty(pg_total_relation_size('dia_object'))").fetchone()[0]
            print(f"# postgres: dia_object total size {size}", flush=True)
        else:
            du = sum(f.stat().st_size for f in Path(store.root).rglob("*.parquet"))
            print(f"# parquet: {du / 2**30:.2f} GiB in {len(list(Path(store.root).rglob('*.parquet')))} files",
                  flush=True)
        cfg = AssociationConfig(radius_arcsec=1.0)
        # warm-up (untimed)
        visit += 1 if args.reuse and backend == "postgres" else 0
        warm = make_visit(sky, ra, dec, 1000, visit, args.seed + visit)
        rep = ingest_dia_sources(store, warm, cfg, ingest_mjd=INGEST_MJD0 + visit * 1e-3)
        n_new_total += rep.n_new_objects
        n_src_total += rep.n_sources
        ph.take()
        for i, n_src in enumerate(int(x) for x in args.sources):
            for _ in range(args.visits[min(i, len(args.visits) - 1)]):
                visit += 1
                df = make_visit(sky, ra, dec, n_src, visit, args.seed + visit)
                c0 = time.process_time()
                t0 = time.perf_counter()
                rep = ingest_dia_sources(store, df, cfg, ingest_mjd=INGEST_MJD0 + visit * 1e-3)
                wall = time.perf_counter() - t0
                cpu = time.process_time() - c0
                phases, sub = ph.take()
                n_new_total += rep.n_new_objects
                n_src_total += rep.n_sources
                matched = rep.n_sources - rep.n_new_objects
                row = dict(backend=backend, objects=n_objects, sources=n_src, visit=visit, wall=wall, cpu=cpu,
                           matched=matched, new=rep.n_new_objects, phases=phases, sub=sub)
                rows.append(row)
                if backend == "postgres" and not args.no_diagnostic:
                    old = rep.dia_object_ids[np.isin(rep.dia_object_ids, ra_ids)]
                    row["diag"] = pg_region_diagnostic(store, df, cfg, np.unique(old))
                    ph.take()  # the diagnostic's own calls are not the next visit's
                frac = matched / rep.n_sources
                print(f"#   visit {visit:3d}: {n_src:>7,} sources  {wall:7.3f} s (cpu here {cpu:6.3f})  matched {frac:.1%}  "
                      + "  ".join(f"{k}={v:.3f}" for k, v in phases.items()), flush=True)
                if rep.n_sources != n_src or not 0.65 <= frac <= 0.8:
                    print(f"# ERROR: visit {visit}: {rep.n_sources} sources ingested, matched {frac:.1%} "
                          "(expected ~70 %)")
                    ok = False
        n_obj_now, n_src_now = count_current(store, backend, url)
        want_obj = n_objects + n_new_total
        if n_obj_now != want_obj or n_src_now != n_src_total:
            print(f"# ERROR: {backend}: {n_obj_now} current objects (want {want_obj}), "
                  f"{n_src_now} dia_source rows (want {n_src_total})")
            ok = False
        else:
            print(f"# {backend}: check ok: {n_obj_now:,} current objects = {n_objects:,} stored + "
                  f"{n_new_total:,} new; {n_src_now:,} dia_source rows", flush=True)
    return rows, ok


def print_table(rows: list[dict]) -> None:
    print()
    print("| backend | objects | sources/visit | visits | wall median (s) | wall max (s) | python CPU median (s) | "
          + " | ".join(PHASES) + " | other |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(PHASES) + 1))
    groups = defaultdict(list)
    for r in rows:
        groups[(r["backend"], r["objects"], r["sources"])].append(r)
    for (backend, n_obj, n_src), rs in groups.items():
        walls = np.array([r["wall"] for r in rs])
        med = {p: float(np.median([r["phases"].get(p, 0.0) for r in rs])) for p in PHASES}
        other = float(np.median([r["wall"] - sum(r["phases"].values()) for r in rs]))
        print(f"| {backend} | {n_obj:,} | {n_src:,} | {len(rs)} | {np.median(walls):.3f} | {walls.max():.3f} | "
              f"{np.median([r['cpu'] for r in rs]):.3f} | "
              + " | ".join(f"{med[p]:.3f}" for p in PHASES) + f" | {other:.3f} |")
    print()
    print("nested diagnostics (median s per visit, already inside the phases above):")
    for (backend, n_obj, n_src), rs in groups.items():
        keys = sorted({k for r in rs for k in r["sub"]})
        for k in keys:
            v = float(np.median([r["sub"].get(k, 0.0) for r in rs]))
            print(f"  {backend:8s} {n_obj:>11,} objects {n_src:>7,} sources  {k}: {v:.3f}")
    diag = [(key, rs) for key, rs in groups.items() if any("diag" in r for r in rs)]
    if diag:
        print()
        print("Postgres region read after each visit, same region (median s; untimed in the table above):")
        for (backend, n_obj, n_src), rs in diag:
            keys = [k for k in rs[0]["diag"] if k not in ("rows", "touched")]
            rows_med = float(np.median([r["diag"]["rows"] for r in rs]))
            tmed = float(np.median([r["diag"]["touched"] for r in rs]))
            print(f"  {n_obj:>11,} objects {n_src:>7,} sources, {rows_med:,.0f} rows x 186 columns "
                  f"({tmed:,.0f} touched): "
                  + "; ".join(f"{k} {np.median([r['diag'][k] for r in rs]):.3f}" for k in keys))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=float, default=1e6, help="stored DIAObjects (default 1e6)")
    ap.add_argument("--sources", type=float, nargs="+", default=[1e4], help="DIASources per visit")
    ap.add_argument("--visits", type=int, nargs="+", default=[5],
                    help="timed visits per batch size (one per --sources entry; the last repeats)")
    ap.add_argument("--backends", nargs="+", default=["postgres", "parquet"], choices=["postgres", "parquet"])
    ap.add_argument("--density", type=float, default=30_000.0, help="stored objects per deg^2")
    ap.add_argument("--chunk", type=int, default=1_000_000, help="objects per load transaction")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-diagnostic", action="store_true",
                    help="skip the Postgres region-read diagnostic after each visit")
    ap.add_argument("--no-vacuum", action="store_true",
                    help="Postgres: only ANALYZE after the load (no VACUUM: visibility map not yet set)")
    ap.add_argument("--reuse", default=None, metavar="URL",
                    help="Postgres: skip the load and use this database loaded earlier by this script "
                         "(same --objects/--density/--seed); it is not dropped")
    ap.add_argument("--workdir", default=None, help="parent of the temporary Parquet store")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"# association end to end: {machine_line()} git={git_rev()}")
    ph = Phases()
    install_timers(ph)
    all_rows: list[dict] = []
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="bench_e2e_", dir=args.workdir) as workdir:
            for backend in args.backends:
                if backend == "postgres":
                    with fresh_database("archive_bench_e2e_probe") as probe:
                        print(f"# PostgreSQL {pg_version(probe)}")
                rows, good = run_backend(backend, args, ph, workdir)
                all_rows += rows
                ok &= good
    finally:
        ph.restore()
    print_table(all_rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
