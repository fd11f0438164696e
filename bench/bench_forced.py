"""Benchmark: forced PSF photometry of a list of 10^5 positions on 10 epochs of a 4k x 4k field.

A synthetic field made here with numpy (not the simulator): ``--n`` stars (default 100,000)
at uniform sub-pixel positions over a ``--size`` x ``--size`` image (default 4096), fluxes
from a power law (``N(>F) ~ F^-0.6`` from 150 counts, at most 2e5), on a background-subtracted
sky of 400 counts/px (the variance plane is sky + stars, the noise drawn from it).  Each
epoch has its own seeing (FWHM 2.6-3.6 px) and PSF: a spatially varying Moffat (beta 3.5)
pixelized into an ``archive.image.psf.PixelPSF`` (degree 2), the kind of PSF a calexp carries.
The list is the stars' true positions, so every row has a known flux.

Timed per epoch: :func:`archive.process.forced.forced_photometry` of the whole list with the
default config (fixed positions, neighbours within 2.5 FWHM fitted jointly, bright
positions outside a fit modelled); wall time, rows/s, and the pulls
``(flux - true) / error`` of the rows with S/N > 5 as a check (UNRESOLVED rows left out:
two list positions closer than 0.2 FWHM each measure their common light).  Once more on epoch 0
with ``recenter=True`` and with ``fit_background=True``.

Beside it: photutils' ``PSFPhotometry`` with the positions fixed (``x_0``, ``y_0`` fixed),
no grouper (each source fitted alone: its fastest mode) and the same PSF as a
``GriddedPSFModel`` (3 x 3 grid of our PSF's kernels oversampled 4x), on a random subset
of ``--photutils-n`` positions (default 2000) of epoch 0, with the same 2 x ceil(2 FWHM) + 1
fit stamps; its time is extrapolated to the whole list (linear in sources: it fits them
one by one) and said so.  Our code is timed on the same subset for the like-for-like
figure, and the two sets of fluxes are compared.

    python bench/bench_forced.py [--n 100000] [--size 4096] [--epochs 10] [--photutils-n 2000] [--seed 1]
    python bench/bench_forced.py --via-list      # the same through the forced_list step's path

``--via-list``: the list path of ``archive forced --list`` instead of the bare function.  The
positions become a user's list (ra, dec, id through a TAN WCS at 0.2"/px) registered in a new
Parquet archive (:func:`archive.pipeline.forced_lists.register_list`: read, checked, copied);
each epoch is a calexp FITS file (with WCS and calibration) in its products directory, and per
epoch the step's worker (:func:`archive.pipeline.forced_lists.measure_list`: read the list,
keep what falls near the exposure, read the calexp, put it in nJy, map the positions through
the WCS, fit) and its rows written to ``list_forced_source`` (validated, one transaction)
are timed.  Epoch-making and the FITS write are not timed.

The process sets glibc's allocator as a pipeline worker does
(``archive.pipeline.runtime.keep_freed_memory``; ``--no-worker-allocator`` leaves it).

Not run as a test.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import warnings

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from archive.image.exposure import Exposure  # noqa: E402
from archive.image.psf import MoffatPSF, PixelPSF  # noqa: E402
from archive.process.flags import FLAG_BLENDED, FLAG_CENTROID, FLAG_UNRESOLVED  # noqa: E402
from archive.process.forced import ForcedConfig, forced_photometry  # noqa: E402
from archive.process.stamps import PaddedFrame, chunks  # noqa: E402

SKY = 400.0


def star_list(n: int, size: int, rng: np.random.Generator):
    x = rng.uniform(-0.5, size - 0.5, n)
    y = rng.uniform(-0.5, size - 0.5, n)
    u = rng.uniform(0.0, 1.0, n)
    f = np.minimum(150.0 * u ** (-1.0 / 0.6), 2e5)
    return x, y, f


def epoch_psf(fwhm: float, size: int) -> PixelPSF:
    bbox = (0.0, 0.0, float(size - 1), float(size - 1))
    moffat = MoffatPSF(fwhm, beta=3.5, variation=[0.04, -0.03], bbox=bbox, oversample=3)
    return PixelPSF.from_psf(moffat, bbox, degree=2)


def draw(shape, psf, x, y, f, stamp: int = 31) -> np.ndarray:
    """Image of ``f * P`` (unit-flux stamps, not renormalised) at (x, y), float64."""
    half = stamp // 2
    fr = PaddedFrame(shape, half + 1)
    acc = np.zeros(fr.size)
    for sl in chunks(x.size, 20000):
        xc = np.floor(x[sl] + 0.5).astype(np.int64)
        yc = np.floor(y[sl] + 0.5).astype(np.int64)
        st = psf.stamps(x[sl], y[sl], stamp, xc, yc) * f[sl, None, None]
        acc += np.bincount(fr.index(xc, yc, stamp).ravel(), weights=st.ravel().astype(np.float64), minlength=fr.size)
    return fr.crop(acc).copy()


def make_epoch(x, y, f, size: int, fwhm: float, rng: np.random.Generator) -> Exposure:
    psf = epoch_psf(fwhm, size)
    model = draw((size, size), psf, x, y, f)
    var = SKY + model
    img = model + rng.standard_normal(model.shape) * np.sqrt(var)
    return Exposure(img.astype(np.float32), variance=var.astype(np.float32), psf=psf)


def pull_stats(df, f):
    """Rows with S/N > 5 that are not UNRESOLVED (two list positions closer than
    min_separation_fwhm measure their common light, not their own): count, sd, mean."""
    err = df["psf_flux_err"].to_numpy()
    p = (df["psf_flux"].to_numpy() - f) / err
    good = np.isfinite(p) & (f / err > 5) & ((df["flags"].to_numpy() & int(FLAG_UNRESOLVED)) == 0)
    return int(good.sum()), float(np.std(p[good])), float(np.mean(p[good]))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def photutils_subset(exp: Exposure, x, y, stamp: int):
    from astropy.nddata import NDData
    from astropy.table import Table
    from photutils.psf import GriddedPSFModel, PSFPhotometry

    k = 4
    size = exp.width
    g = np.linspace(0, size - 1, 3)
    xy = [(float(a), float(b)) for b in g for a in g]
    kern = 2 * (exp.psf.basis.shape[1] // 2) + 1
    data = np.array([exp.psf.kernel(a, b, kern, oversample=k) for a, b in xy])
    model = GriddedPSFModel(NDData(data, meta={"grid_xypos": xy, "oversampling": k}))
    model.x_0.fixed = True
    model.y_0.fixed = True
    phot = PSFPhotometry(model, (stamp, stamp), aperture_radius=3.0)
    init = Table({"x": x, "y": y, "flux": np.full(x.size, 1000.0)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tab = phot(exp.image.astype(np.float64), error=np.sqrt(exp.variance.astype(np.float64)), init_params=init)
    return np.asarray(tab["flux_fit"], dtype=float), np.asarray(tab["flux_err"], dtype=float)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--photutils-n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--via-list", action="store_true", help="through the forced_list step's path (see the docstring)")
    ap.add_argument("--no-worker-allocator", action="store_true",
                    help="leave glibc's allocator as it is (a pipeline worker calls keep_freed_memory())")
    args = ap.parse_args(argv)
    if not args.no_worker_allocator:  # as archive's pipeline workers do: freed planes are reused
        from archive.pipeline.runtime import keep_freed_memory

        keep_freed_memory()
    rng = np.random.default_rng(args.seed)
    x, y, f = star_list(args.n, args.size, rng)
    fwhms = rng.uniform(2.6, 3.6, args.epochs)
    if args.via_list:
        return via_list(args, x, y, f, fwhms, rng)
    print(f"forced photometry: {args.n} positions, {args.size}x{args.size} px, {args.epochs} epochs; "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'epoch':>5} {'FWHM':>5} {'make s':>7} {'forced s':>9} {'rows/s':>9} {'S/N>5':>7} "
          f"{'pull sd':>8} {'pull mean':>9} {'blended':>8} {'unres':>6} {'refit':>6}")
    times = []
    first = None
    for e in range(args.epochs):
        exp, t_make = timed(lambda: make_epoch(x, y, f, args.size, float(fwhms[e]), rng))
        df, t = timed(lambda: forced_photometry(exp, x, y))
        times.append(t)
        n5, sd, mean = pull_stats(df, f)
        blended = int((df["flags"].to_numpy() & int(FLAG_BLENDED) != 0).sum())
        unresolved = int((df["flags"].to_numpy() & int(FLAG_UNRESOLVED) != 0).sum())
        print(f"{e:>5} {fwhms[e]:>5.2f} {t_make:>7.1f} {t:>9.2f} {args.n / t:>9.0f} {n5:>7} {sd:>8.3f} "
              f"{mean:>+9.3f} {blended:>8} {unresolved:>6} {df.attrs['refit_for_bright']:>6}")
        if e == 0:
            first = (exp, df, t)
        else:
            del exp
    med = float(np.median(times))
    print(f"median per epoch {med:.2f} s ({args.n / med:.0f} rows/s); all {args.epochs} epochs "
          f"{sum(times):.1f} s; load average {os.getloadavg()[0]:.1f}")
    exp, df0, t0 = first
    for name, cfg in (("recenter=True", ForcedConfig(recenter=True)),
                      ("fit_background=True", ForcedConfig(fit_background=True))):
        d, t = timed(lambda: forced_photometry(exp, x, y, cfg))
        n5, sd, mean = pull_stats(d, f)
        extra = f", moved {int(d['moved'].sum())}, refused {int((d['flags'].to_numpy() & int(FLAG_CENTROID) != 0).sum())}" \
            if cfg.recenter else ""
        print(f"epoch 0, {name}: {t:.2f} s ({args.n / t:.0f} rows/s), S/N>5 {n5}, pull sd {sd:.3f}, "
              f"mean {mean:+.3f}{extra}")

    # photutils on a subset of epoch 0, and ours on the same subset
    m = min(args.photutils_n, args.n)
    sub = np.sort(rng.choice(args.n, m, replace=False))
    stamp = int(df0.attrs["stamp_size"])
    ours_sub, t_ours = timed(lambda: forced_photometry(exp, x[sub], y[sub]))
    ours_iso, t_iso = timed(lambda: forced_photometry(exp, x[sub], y[sub],
                                                      ForcedConfig(blend_radius_fwhm=0.0, subtract_bright=False)))
    (pf, pe), t_pu = timed(lambda: photutils_subset(exp, x[sub], y[sub], stamp))
    print(f"subset of {m} positions on epoch 0 (fit stamp {stamp}x{stamp}):")
    print(f"  archive forced (default: the subset's own neighbours)   {t_ours:7.2f} s  {m / t_ours:9.0f} rows/s")
    print(f"  archive forced (each position alone, as photutils)       {t_iso:7.2f} s  {m / t_iso:9.0f} rows/s")
    print(f"  photutils PSFPhotometry (fixed x_0, y_0; no grouper)     {t_pu:7.2f} s  {m / t_pu:9.0f} rows/s"
          f"  -> {args.n} positions: ~{t_pu * args.n / m:.0f} s per epoch (extrapolated, linear)")
    err = ours_iso["psf_flux_err"].to_numpy()
    dif = (ours_iso["psf_flux"].to_numpy() - pf) / err
    ok = np.isfinite(dif) & (pe > 0)  # photutils gives a zero error where its fit did not move
    print(f"  flux difference archive (alone) - photutils, in archive errors: median |d| "
          f"{np.median(np.abs(dif[ok])):.2e}, 95% {np.percentile(np.abs(dif[ok]), 95):.2e}, max "
          f"{np.max(np.abs(dif[ok])):.2e} ({int(ok.sum())} rows); error ratio median {np.nanmedian(pe / err):.4f}")
    # pulls of the subset's isolated rows (no other star of the list within 3 FWHM: the
    # subset alone does not hold the neighbours' positions, so a blended row carries their light)
    from scipy.spatial import cKDTree

    dnn = cKDTree(np.column_stack([x, y])).query(np.column_stack([x[sub], y[sub]]), k=2)[0][:, 1]
    iso = dnn > 3 * df0.attrs["fwhm"]
    with np.errstate(invalid="ignore", divide="ignore"):
        p_ours = (ours_iso["psf_flux"].to_numpy() - f[sub]) / err
        p_pu = (pf - f[sub]) / pe
    g = iso & np.isfinite(p_pu) & np.isfinite(p_ours) & (f[sub] / err > 5)
    print(f"  pulls vs truth of the {int(g.sum())} isolated subset rows with S/N > 5: archive sd "
          f"{np.std(p_ours[g]):.3f} mean {np.mean(p_ours[g]):+.3f}; photutils sd {np.std(p_pu[g]):.3f} "
          f"mean {np.mean(p_pu[g]):+.3f}")
    return 0


def via_list(args, x, y, f, fwhms, rng) -> int:
    """The list path: register the list in a new archive, then per epoch the step's worker and
    the rows' write (see the module docstring)."""
    import tempfile

    import pandas as pd
    from astropy.wcs import WCS

    from archive.api import Archive
    from archive.catalog.validate import conform
    from archive.image.calib import PhotoCalib
    from archive.pipeline.forced_lists import ForcedListConfig, measure_list, register_list
    from archive.pipeline.products import ProductStore

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [(args.size + 1) / 2.0] * 2
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    ra, dec = w.all_pix2world(x, y, 0)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_forced_list_"))
    pd.DataFrame({"id": np.arange(args.n), "ra": ra, "dec": dec}).to_parquet(tmp / "list.parquet")
    arc = Archive.init(tmp / "arc")
    root = arc.products_root()
    (lid, _), t_reg = timed(lambda: register_list(arc.store, tmp / "list.parquet", root, images="calexp"))
    order = np.argsort(pd.read_parquet(root / f"lists/list-{lid}.parquet")["list_object_id"].to_numpy())
    print(f"forced photometry through the list path: {args.n} positions, {args.size}x{args.size} px, "
          f"{args.epochs} epochs; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
          f"list registered in {t_reg:.2f} s")
    print(f"{'epoch':>5} {'FWHM':>5} {'measure s':>10} {'write s':>8} {'total s':>8} {'rows/s':>9} {'rows':>7} "
          f"{'S/N>5':>7} {'pull sd':>8} {'pull mean':>9}")
    products = ProductStore(root)
    cfg = ForcedListConfig()
    totals = []
    for e in range(args.epochs):
        exp = make_epoch(x, y, f, args.size, float(fwhms[e]), rng)
        exp.wcs, exp.photo_calib = w, PhotoCalib(1.0)
        rel = f"calexp/bench_{e}.fits"
        (root / "calexp").mkdir(parents=True, exist_ok=True)
        exp.writeto(root / rel)
        del exp
        payload = {"list": f"lists/list-{lid}.parquet", "calexp": rel, "diff": None, "recenter": False}
        res, t_m = timed(lambda: measure_list(payload, products, cfg))

        def write():
            rows = res[np.isfinite(res["psf_flux"].to_numpy())].assign(
                list_id=lid, exposure_id=e + 1, visit=e + 1, detector=0, band="r", mjd=60000.0 + e, forced=True,
                list_forced_source_id=np.arange(len(res), dtype=np.int64) + e * args.n)
            rows["ra"] = rows["ra"] % 360.0
            arc.store.write("list_forced_source", conform(arc.store.table("list_forced_source"), rows))
            return len(rows)

        n_rows, t_w = timed(write)
        t = t_m + t_w
        totals.append(t)
        truth = f[res["list_object_id"].to_numpy()]
        n5, sd, mean = pull_stats(res, truth)
        print(f"{e:>5} {fwhms[e]:>5.2f} {t_m:>10.2f} {t_w:>8.2f} {t:>8.2f} {n_rows / t:>9.0f} {n_rows:>7} {n5:>7} "
              f"{sd:>8.3f} {mean:>+9.3f}")
    med = float(np.median(totals))
    print(f"median per epoch {med:.2f} s ({args.n / med:.0f} rows/s); all {args.epochs} epochs {sum(totals):.1f} s; "
          f"{arc.count('list_forced_source')} rows stored; load average {os.getloadavg()[0]:.1f}")
    del order
    arc.close()
    # photutils beside it, on a subset of a fresh epoch at the same positions (fixed)
    exp = make_epoch(x, y, f, args.size, float(fwhms[0]), rng)
    m = min(args.photutils_n, args.n)
    sub = np.sort(rng.choice(args.n, m, replace=False))
    stamp = int(forced_photometry(exp, x[:10], y[:10]).attrs["stamp_size"])
    _, t_pu = timed(lambda: photutils_subset(exp, x[sub], y[sub], stamp))
    print(f"photutils PSFPhotometry (fixed x_0, y_0; no grouper) on {m} positions: {t_pu:.2f} s ({m / t_pu:.0f} "
          f"rows/s) -> {args.n} positions: ~{t_pu * args.n / m:.0f} s per epoch (extrapolated, linear)")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
