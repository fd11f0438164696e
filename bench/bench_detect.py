"""Benchmark: detection + measurement of a 4096x4096 simulated image.

Compares archive.process (background, matched-filter detection, deblending,
simultaneous PSF fits, apertures r = 3, 6, 12 px, moments, flags) with SEP,
photutils (detect_sources + SourceCatalog + aperture photometry) and SExtractor
(``source-extractor``, when installed; also with PSFEx and PSF fits, the chain
that measures PSF fluxes as archive does) on the same ISR-processed simulated frame.
Each tool runs in a fresh subprocess, ``--repeat`` times interleaved after one
memory pre-warm (see :func:`prewarm_memory`); the table gives the median wall time
and its range, the median time of the same frame run again in the same process
(a pipeline worker's cost per frame; not for SExtractor, a program started per
image), peak memory (tracemalloc peak of Python/numpy allocations, from one
extra untimed run, and the timed run's peak RSS, VmHWM; for SExtractor the child's
max RSS) and
completeness / purity against the simulator's truth.

    python bench/bench_detect.py [--size 4096] [--workdir /tmp/bench_detect] [--repeat 3] [--tools archive,sep]

Completeness: unsaturated stars with true S/N > 10 and no object of comparable
brightness (> 30%) within 1.5 FWHM, matched within 1.5 px. Purity: detections with
their own S/N > 10 (flux / flux error; PSF flux for archive, 6 px aperture for the
others) lying within max(1.5 px, FWHM / 2) of any true object. Not run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(work: pathlib.Path, size: int) -> None:
    """Simulate one visit, build masters, run ISR; save image/variance/mask/truth."""
    import pandas as pd

    from archive.image.raw import read_raw
    from archive.process import isr
    from archive.process.masters import make_master_bias, make_master_dark, make_master_flat
    from archive.sim import SimConfig, load_manifest, simulate_survey, truth_psf

    if (work / "done").exists():
        return
    sim = work / "sim"
    if sim.exists():
        shutil.rmtree(sim)
    t = time.perf_counter()
    simulate_survey(sim, SimConfig(seed=11, n_epochs=1, size=size, star_density=40.0, n_bias=3, n_dark=3, n_flat=3))
    man = load_manifest(sim)
    bias = make_master_bias([read_raw(sim / c["path"]) for c in man["calib"]["bias"]])
    dark = make_master_dark([read_raw(sim / c["path"]) for c in man["calib"]["dark"]], bias)
    flat = make_master_flat([read_raw(sim / c["path"]) for c in man["calib"]["flat"]["r"]], bias, dark)
    exp = isr.run(read_raw(sim / man["raws"][0]["path"]), bias, dark, flat)
    np.save(work / "image.npy", exp.image)
    np.save(work / "variance.npy", exp.variance)
    np.save(work / "mask.npy", exp.mask)
    from astropy.io import fits

    fits.PrimaryHDU(exp.image).writeto(work / "image.fits", overwrite=True)
    fits.PrimaryHDU((1.0 / np.sqrt(exp.variance)).astype(np.float32)).writeto(work / "weight.fits", overwrite=True)
    truth = pd.read_parquet(sim / "truth" / "sources.parquet")
    epoch = pd.read_parquet(sim / "truth" / "epochs.parquet").iloc[0]
    p = truth_psf(epoch).stamps(truth.x.to_numpy(), truth.y.to_numpy(), 31, renormalize=True)
    p2 = (p ** 2).sum(axis=(1, 2))
    p3 = (p ** 3).sum(axis=(1, 2))
    g = float(epoch.gain)
    skyv = float(epoch.sky_e) / g ** 2 + (5.0 / g) ** 2
    c = truth.counts.to_numpy()
    truth["snr"] = c / np.sqrt(skyv / p2 + c * p3 / (g * p2 ** 2))
    truth.to_parquet(work / "truth.parquet")
    (work / "meta.json").write_text(json.dumps({"fwhm": float(epoch.psf_fwhm), "prep_s": time.perf_counter() - t}))
    shutil.rmtree(sim)
    (work / "done").write_text("ok")


def _load(work):
    return (np.load(work / "image.npy"), np.load(work / "variance.npy"), np.load(work / "mask.npy"),
            json.loads((work / "meta.json").read_text()))


def run_archive(work):
    from archive.process.background import estimate_background
    from archive.process.cosmic import find_cosmic_rays
    from archive.process.psf_estimate import estimate_psf
    from archive.process.sources import detect_and_measure

    from archive.pipeline.runtime import keep_freed_memory

    keep_freed_memory()  # as `archive process` does in each worker
    img, var, mask, meta = _load(work)
    t0 = time.perf_counter()
    bad = (mask & 0b10011) != 0
    bkg = estimate_background(img, mask=bad)
    t_bkg = time.perf_counter() - t0
    sub = img - bkg.background
    t_psf = time.perf_counter()
    psf = estimate_psf(sub, var, mask=mask, background_variance=bkg.variance)
    t_psf = time.perf_counter() - t_psf
    cr, sub = find_cosmic_rays(sub, var, psf.fwhm, mask=mask)
    mask = mask | np.where(cr, np.int32(1 << 2), np.int32(0))
    t_dm = time.perf_counter()
    df, _ = detect_and_measure(sub, var, psf.psf, mask=mask, background_variance=bkg.variance, background=bkg.background)
    t_dm = time.perf_counter() - t_dm
    wall = time.perf_counter() - t0
    return {"x": df.x.to_numpy().tolist(), "y": df.y.to_numpy().tolist(), "snr": df.snr.to_numpy().tolist(),
            "wall": wall, "note": f"background {t_bkg:.2f} s, PSF estimation {t_psf:.2f} s, CR finding, detect+measure {t_dm:.2f} s"}


def run_sep(work):
    import sep

    img, var, mask, meta = _load(work)
    img = np.ascontiguousarray(img, dtype=np.float32)
    t0 = time.perf_counter()
    bad = (mask & 0b10011) != 0
    bkg = sep.Background(img, mask=bad, bw=64, bh=64)
    sub = img - bkg.back()
    sep.set_extract_pixstack(20_000_000)
    sep.set_sub_object_limit(4096)
    err = np.sqrt(var).astype(np.float32)
    objs = sep.extract(sub, 3.0, err=err, mask=bad, minarea=5)
    phot = [sep.sum_circle(sub, objs["x"], objs["y"], r, err=err, mask=bad) for r in (3.0, 6.0, 12.0)]
    wall = time.perf_counter() - t0
    flux, ferr, _ = phot[1]
    snr = flux / np.maximum(ferr, 1e-30)
    return {"x": objs["x"].tolist(), "y": objs["y"].tolist(), "snr": snr.tolist(), "wall": wall,
            "note": "extract at 3 sigma (err=sqrt(var)), minarea 5; apertures 3/6/12 px"}


def run_photutils(work):
    from astropy.convolution import convolve_fft
    from photutils.aperture import CircularAperture, aperture_photometry
    from photutils.background import Background2D, MedianBackground
    from photutils.segmentation import SourceCatalog, detect_sources, make_2dgaussian_kernel

    img, var, mask, meta = _load(work)
    t0 = time.perf_counter()
    bad = (mask & 0b10011) != 0
    bkg = Background2D(img, (64, 64), filter_size=(3, 3), mask=bad, bkg_estimator=MedianBackground())
    sub = img - bkg.background
    kernel = make_2dgaussian_kernel(meta["fwhm"], size=2 * int(2 * meta["fwhm"]) + 1)
    conv = convolve_fft(sub, kernel, mask=bad)
    # noise of the filtered image: sigma * sqrt(sum(kernel^2)) for a unit-sum kernel
    thresh = 3.0 * np.sqrt(var) * np.sqrt((kernel.array ** 2).sum())
    segm = detect_sources(conv, thresh, n_pixels=5, mask=bad)
    cat = SourceCatalog(sub, segm, convolved_data=conv, error=np.sqrt(var), mask=bad)
    x = np.asarray(cat.xcentroid)
    y = np.asarray(cat.ycentroid)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    phot = aperture_photometry(sub, [CircularAperture(np.c_[x, y], r) for r in (3.0, 6.0, 12.0)], error=np.sqrt(var),
                               mask=bad)
    wall = time.perf_counter() - t0
    snr = np.asarray(phot["aperture_sum_1"]) / np.maximum(np.asarray(phot["aperture_sum_err_1"]), 1e-30)
    return {"x": x.tolist(), "y": y.tolist(), "snr": snr.tolist(), "wall": wall,
            "note": "Background2D, Gaussian-filtered 3 sigma segmentation (no deblend), SourceCatalog, apertures"}


def run_sextractor(work):
    exe = shutil.which("source-extractor") or shutil.which("sex")
    if exe is None:
        return None
    params = work / "sex.param"
    params.write_text("X_IMAGE\nY_IMAGE\nFLUX_APER(3)\nFLUXERR_APER(3)\nFLUX_AUTO\nFLUXERR_AUTO\nFLAGS\n")
    conv = work / "gauss.conv"
    conv.write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    cat = work / "sex.cat"
    img, var, mask, meta = _load(work)
    cmd = [exe, str(work / "image.fits"), "-c", "/dev/null", "-PARAMETERS_NAME", str(params), "-FILTER_NAME", str(conv),
           "-CATALOG_NAME", str(cat), "-CATALOG_TYPE", "ASCII", "-DETECT_THRESH", "3.0", "-ANALYSIS_THRESH", "3.0",
           "-DETECT_MINAREA", "5", "-PHOT_APERTURES", "6,12,24", "-BACK_SIZE", "64", "-WEIGHT_TYPE", "MAP_WEIGHT",
           "-WEIGHT_IMAGE", str(work / "weight.fits"), "-SATUR_LEVEL", "1e9", "-VERBOSE_TYPE", "QUIET",
           "-MEMORY_PIXSTACK", "20000000", "-MEMORY_OBJSTACK", "60000", "-MEMORY_BUFSIZE", "4096",
           "-NTHREADS", "1"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    a = np.loadtxt(cat, ndmin=2)
    x, y = a[:, 0] - 1.0, a[:, 1] - 1.0
    snr = a[:, 3] / np.maximum(a[:, 6], 1e-30)
    return {"x": x.tolist(), "y": y.tolist(), "snr": snr.tolist(), "wall": wall, "rss_mb": rss,
            "note": "DETECT_THRESH 3 (weight map), minarea 5, 3x3 filter, apertures 3/6/12 px (NTHREADS 1)"}


def run_sextractor_psfex(work):
    """The like-for-like peer of archive: PSF-fit fluxes the SExtractor way.

    SExtractor at 10 sigma writes star vignettes (FITS_LDAC), PSFEx builds a PSF varying
    to 2nd order over the frame from them, SExtractor runs again at 3 sigma with that PSF
    fitting PSF fluxes and positions beside the apertures. All three are timed.
    """
    exe = shutil.which("source-extractor") or shutil.which("sex")
    psfex = shutil.which("psfex")
    if exe is None or psfex is None:
        return None
    conv = work / "gauss.conv"
    conv.write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    p1 = work / "psfex_pass1.param"
    p1.write_text("X_IMAGE\nY_IMAGE\nXWIN_IMAGE\nYWIN_IMAGE\nFLUX_APER(1)\nFLUXERR_APER(1)\nFLUX_RADIUS\n"
                  "ELONGATION\nFLAGS\nSNR_WIN\nVIGNET(25,25)\n")
    p2 = work / "psfex_pass2.param"
    p2.write_text("XPSF_IMAGE\nYPSF_IMAGE\nFLUX_PSF\nFLUXERR_PSF\nFLUX_APER(3)\nFLUXERR_APER(3)\nFLAGS\n")
    common = ["-c", "/dev/null", "-FILTER_NAME", str(conv), "-DETECT_MINAREA", "5", "-BACK_SIZE", "64",
              "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_IMAGE", str(work / "weight.fits"), "-SATUR_LEVEL", "1e9",
              "-VERBOSE_TYPE", "QUIET", "-MEMORY_PIXSTACK", "20000000", "-MEMORY_OBJSTACK", "60000",
              "-MEMORY_BUFSIZE", "4096", "-NTHREADS", "1"]
    cat1, cat2 = work / "psfex_pass1.cat", work / "psfex_pass2.cat"
    img = str(work / "image.fits")
    t0 = time.perf_counter()
    subprocess.run([exe, img, *common, "-PARAMETERS_NAME", str(p1), "-CATALOG_NAME", str(cat1),
                    "-CATALOG_TYPE", "FITS_LDAC", "-DETECT_THRESH", "10", "-ANALYSIS_THRESH", "10",
                    "-PHOT_APERTURES", "12"], check=True)
    t1 = time.perf_counter()
    subprocess.run([psfex, str(cat1), "-c", "/dev/null", "-PSF_SIZE", "25,25", "-PSFVAR_DEGREES", "2",
                    "-CHECKPLOT_TYPE", "NONE", "-CHECKIMAGE_TYPE", "NONE", "-WRITE_XML", "N", "-NTHREADS", "1",
                    "-VERBOSE_TYPE", "QUIET", "-PSF_DIR", str(work)], check=True)
    t2 = time.perf_counter()
    subprocess.run([exe, img, *common, "-PARAMETERS_NAME", str(p2), "-CATALOG_NAME", str(cat2),
                    "-CATALOG_TYPE", "ASCII", "-DETECT_THRESH", "3", "-ANALYSIS_THRESH", "3",
                    "-PHOT_APERTURES", "6,12,24", "-PSF_NAME", str(work / "psfex_pass1.psf")], check=True)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    a = np.loadtxt(cat2, ndmin=2)
    ok = np.isfinite(a[:, 0]) & np.isfinite(a[:, 1])
    a = a[ok]
    x, y = a[:, 0] - 1.0, a[:, 1] - 1.0
    snr = a[:, 2] / np.maximum(a[:, 3], 1e-30)
    return {"x": x.tolist(), "y": y.tolist(), "snr": snr.tolist(), "wall": wall, "rss_mb": rss,
            "note": f"SExtractor 10 sigma + vignettes {t1 - t0:.2f} s, PSFEx (degree 2) {t2 - t1:.2f} s, "
                    f"SExtractor 3 sigma with PSF fits {wall - (t2 - t0):.2f} s (NTHREADS 1)"}


TOOLS = {"archive": run_archive, "sep": run_sep, "photutils": run_photutils, "sextractor": run_sextractor,
         "sextractor+psfex": run_sextractor_psfex}


def _vmhwm_mb() -> float:
    """Peak resident set size of this process (VmHWM, MB); unlike ru_maxrss it restarts at exec."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def child(tool: str, work: pathlib.Path, trace: bool) -> None:
    # tracemalloc hooks every allocation, so it runs only in an untimed extra run
    if trace and not tool.startswith("sextractor"):
        tracemalloc.start()
    out = TOOLS[tool](work)
    if out is None:
        print(json.dumps(None))
        return
    if not tool.startswith("sextractor") and not trace:
        # the same frame again in this process: what a pipeline worker pays per frame once it
        # runs (SExtractor, a program run per image, pays its process start every time)
        again = TOOLS[tool](work)
        out["wall_warm"] = again["wall"]
        out["note_warm"] = again["note"]
    if not tool.startswith("sextractor"):
        out["tracemalloc_mb"] = tracemalloc.get_traced_memory()[1] / 2 ** 20 if trace else None
        out["rss_mb"] = _vmhwm_mb()
    (work / f"result_{tool}{'_trace' if trace else ''}.json").write_text(json.dumps(out))


def prewarm_memory(gib: float) -> None:
    """Touch ``gib`` GiB once and free it.

    On a VM whose host backs guest memory lazily (the benchmark machine), the first touch
    of a guest page costs ~3 ms per MB; whichever tool ran first paid it for all. After
    this, every tool gets pages the host already backs -- while they last: the host also
    reclaims pages the guest has freed, so a fresh process still pays part of the cost
    (the "2nd s" column runs the frame again in a process that holds its memory).
    """
    a = np.ones(int(gib * 2 ** 30) // 8)
    del a


def score(work, res, fwhm):
    import pandas as pd
    from scipy.spatial import cKDTree

    truth = pd.read_parquet(work / "truth.parquet")
    x, y, snr = np.asarray(res["x"]), np.asarray(res["y"]), np.asarray(res["snr"])
    c = truth.flux_njy.to_numpy()
    res_ok = np.ones(len(truth), dtype=bool)
    for a, b in cKDTree(np.c_[truth.x, truth.y]).query_pairs(1.5 * fwhm, output_type="ndarray"):
        if c[b] > 0.3 * c[a]:
            res_ok[a] = False
        if c[a] > 0.3 * c[b]:
            res_ok[b] = False
    stars = truth.kind.isin(["star", "variable"]).to_numpy() & ~truth.saturated.to_numpy()
    sel = stars & res_ok & (truth.snr.to_numpy() > 10)
    d, _ = cKDTree(np.c_[x, y]).query(np.c_[truth.x, truth.y])
    comp = float((d[sel] < 1.5).mean())
    d2, _ = cKDTree(np.c_[truth.x, truth.y]).query(np.c_[x, y])
    det = np.isfinite(snr) & (snr > 10)
    pur = float((d2[det] < max(1.5, 0.5 * fwhm)).mean())
    return comp, pur, int(sel.sum()), int(det.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workdir", default="/tmp/bench_detect")
    ap.add_argument("--child", default=None)
    ap.add_argument("--tools", default="archive,sep,photutils,sextractor,sextractor+psfex")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per tool, interleaved; the median is shown")
    ap.add_argument("--prewarm-gib", type=float, default=4.0)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = pathlib.Path(args.workdir)
    if args.child:
        child(args.child, work, args.trace)
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.size)
    prewarm_memory(args.prewarm_gib)
    meta = json.loads((work / "meta.json").read_text())
    tools = args.tools.split(",")
    runs: dict[str, list] = {t: [] for t in tools}

    def launch(tool: str, trace: bool):
        f = work / f"result_{tool}{'_trace' if trace else ''}.json"
        if f.exists():
            f.unlink()
        cmd = [sys.executable, __file__, "--child", tool, "--workdir", str(work)] + (["--trace"] if trace else [])
        subprocess.run(cmd, check=True)
        return json.loads(f.read_text()) if f.exists() else None

    for _ in range(max(1, args.repeat)):
        for tool in tools:
            runs[tool].append(launch(tool, False))
    print(f"image {args.size}x{args.size}, PSF FWHM {meta['fwhm']:.2f} px, nproc {os.cpu_count()}, "
          f"median of {max(1, args.repeat)} interleaved runs (min-max)")
    print(f"{'tool':<16} {'wall s':>7} {'min-max':>11} {'2nd s':>6} {'py peak MB':>10} {'max RSS MB':>10} "
          f"{'n det':>7} {'compl.':>7} {'purity':>7}  note")
    for tool in tools:
        res_all = [r for r in runs[tool] if r is not None]
        if not res_all:
            print(f"{tool:<16} not available")
            continue
        walls = np.array([r["wall"] for r in res_all])
        res = res_all[int(np.argsort(walls)[len(walls) // 2])]
        traced = launch(tool, True) if not tool.startswith("sextractor") else None
        comp, pur, nsel, ndet = score(work, res, meta["fwhm"])
        tm = traced.get("tracemalloc_mb") if traced else None
        tm_s = f"{tm:10.0f}" if tm is not None else f"{'-':>10}"
        rng = f"{walls.min():.2f}-{walls.max():.2f}"
        warm = [r["wall_warm"] for r in res_all if "wall_warm" in r]
        warm_s = f"{np.median(warm):6.2f}" if warm else f"{'-':>6}"
        print(f"{tool:<16} {np.median(walls):7.2f} {rng:>11} {warm_s} {tm_s} {res['rss_mb']:10.0f} "
              f"{len(res['x']):7d} {comp:7.3f} {pur:7.3f}  {res['note']}")
        if warm and res["note_warm"] != res["note"]:
            print(f"{'':<16} 2nd frame in the same process: {res['note_warm']}")
    print(f"(completeness over {nsel} resolvable unsaturated stars with true S/N > 10; purity over detections with S/N > 10)")


if __name__ == "__main__":
    main()
