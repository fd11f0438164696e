"""Benchmark: difference imaging of a 2048^2 and a 4096^2 pair -- this project's Alard-Lupton
(archive.process.diffim.alard_lupton) and ZOGY (archive.process.diffim.zogy) beside
properimage (PyPI, ZOGY) and sfft (PyPI, CPU "Numpy" backend) on the same pair in the same run.

    python bench/bench_diffim.py [--sizes 2048,4096] [--methods al,zogy,properimage,sfft]
                                 [--workdir /tmp/bench_diffim] [--peer-timeout 900] [--peer-mem-gib 14]
                                 [--profile al,zogy --profile-size 4096]

The pair and its truth are bench_zogy.py's (``prepare``: seeded numpy simulation; spatially
varying Moffat PSFs, science FWHM 3.6 px, template 2.7 px; transients, variable stars, masked
cosmic rays in the science, a 64 px NO_DATA strip on the template's left edge; the truth
carries each change's true S/N on the difference).

Each method runs in a fresh subprocess: the table's seconds are the wall time of the
subtraction call alone (inputs already in memory), peak RSS is the process's VmHWM read
right after that call (before detection), "+ inputs" its increase over the RSS with the
inputs loaded.  Then, in the same subprocess, the same detection runs on every method's
difference: this project's ``detect_dia_sources`` (threshold 5 sigma, 2 pixels, positive and
negative) on an Exposure of the difference.  The score it detects on:

* al, zogy: the method's own score (what the pipeline uses: AL's PSF-filtered difference
  over its noise with the matching-error term, ZOGY's S_corr), and also -- rows
  ``al/generic``, ``zogy/generic`` -- the generic score below, for a like-for-like view;
* properimage: its S_corr over its robust (MAD) scatter (its S_corr is not in sigma);
* sfft: the generic score: the difference filtered with its PSF (the science's: sfft
  convolves the template) over the robust scatter of that (sfft gives no variance plane,
  and its noise is correlated, not decorrelated).

Peers' inputs: properimage as in bench_zogy (counts, masked arrays, ``beta=False,
shift=False``); sfft gets the science with its masked cosmic rays filled (this project's
``fill_masked``, as AL does before convolving), masked images for the fit with CR and
NO_DATA pixels zeroed, the template convolved (``ForceConv='REF'``), kernel half-width
ceil(2 FWHM_sci) = 8, ``KerPolyOrder=2, BGPolyOrder=2``, constant flux ratio, as many
threads as cores.  A peer that is not installed is skipped with a message.

Scoring against the truth, everything inside one evaluation region for all methods (8 px
from the borders, 16 px clear of the NO_DATA strip: x >= 80):
completeness = changes with true S/N >= 7 that have a detection of the same sign within
1 px; false positives = detections with no change within 1 px, 'all' and 'away from bright
stars' (no truth star brighter than 3e4 nJy within 3 FWHM_sci = 10.8 px); the false positives
that lie 1-3 px from a change (offset detections of a real change) are counted apart.

``--profile al,zogy``: also runs each named method of the project once under cProfile on
the ``--profile-size`` pair and prints the top functions (cumulative and own time); ZOGY
runs on one thread there (cProfile sees the main thread only).
False positives at equal completeness: the detection step of ``detect_dia_sources`` (its
peaks; every peak is a row) repeated at thresholds 4.5 .. 10 sigma; at the highest threshold
where a method's completeness reaches ``--target-completeness`` (0.95) its false positives
(all / away from bright stars) are given.
Not run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_zogy import _load, prepare, prewarm_memory, properimage_subtract, psfs  # noqa: E402
from common import git_rev, machine_line, vmhwm_mb, vmrss_mb  # noqa: E402

#: Evaluation region: px from the image borders, and the first column clear of the NO_DATA strip.
BORDER, X_MIN = 8, 64 + 16
SNR_MIN, MATCH_PX, OFFSET_PX = 7.0, 1.0, 3.0
BRIGHT_FLUX, BRIGHT_FWHM = 3e4, 3.0
#: Detection thresholds (sigma) tried for the false positives at equal completeness.
SWEEP = np.round(np.arange(4.5, 10.01, 0.5), 2)
SFFT_KER_HW = int(os.environ.get("BENCH_SFFT_KERHW", "8"))  # --sfft-kerhw, --sfft-poly set them for the children
SFFT_POLY = int(os.environ.get("BENCH_SFFT_POLY", "1"))
PEERS = {"properimage": "properimage", "sfft": "sfft"}


# --------------------------------------------------------------------------- subtraction, per method

def _exposures(a: dict, size: int):
    from archive.image.exposure import Exposure

    pn, pr = psfs(size)
    return (Exposure(a["sci_image"], a["sci_mask"], a["sci_var"], psf=pn),
            Exposure(a["tpl_image"], a["tpl_mask"], a["tpl_var"], psf=pr))


def _timed(fn):
    base = vmrss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "base_mb": base,
                 "rss_mb": vmhwm_mb()}


def sub_al(a: dict, size: int):
    from archive.process.diffim.alard_lupton import subtract

    sci, tpl = _exposures(a, size)
    a.clear()
    res, t = _timed(lambda: subtract(sci, tpl))
    m = res.metadata
    t["note"] = (f"convolved {m['convolved']}, kernel {m['kernel_size']} px, {m['n_stamps']} stamps, "
                 f"matching error {m['matching_error']:.3g}")
    return res.difference, res.score, t


def sub_zogy(a: dict, size: int):
    from archive.process.diffim.zogy import ZogyConfig, zogy_difference

    sci, tpl = _exposures(a, size)
    a.clear()
    threads = int(os.environ.get("BENCH_ZOGY_THREADS", "0"))  # 1 under cProfile: it sees the main thread only
    res, t = _timed(lambda: zogy_difference(sci, tpl, ZogyConfig(threads=threads)))
    m = res.metadata
    t["note"] = (f"{m['n_subimages']} cores, FFT {m['fft_shape']}, kernel {m['kernel_size']}, "
                 f"{m['refined_pixels']} masked pixels re-solved")
    return res.difference, res.score, t


def _peer_exposure(diff: np.ndarray, mask: np.ndarray, size: int):
    """An Exposure of a peer's difference for detect_dia_sources: the science PSF (used for
    the measurement only: detection is on the score), a flat variance from the robust scatter."""
    from archive.image.exposure import Exposure
    from archive.process.robust import mad_sigma

    pn, _ = psfs(size)
    ok = np.isfinite(diff)
    var = float(mad_sigma(diff[ok])) ** 2
    variance = np.where(ok, var, np.inf).astype(np.float32)
    return Exposure(np.where(ok, diff, 0.0).astype(np.float32), mask, variance, psf=pn)


def _union_mask(a: dict) -> np.ndarray:
    return (a["sci_mask"] | a["tpl_mask"]).astype(np.int32)


def sub_properimage(a: dict, size: int):
    from archive.process.robust import mad_sigma

    mask = _union_mask(a)
    r = properimage_subtract(a)
    t = {k: r[k] for k in ("wall", "cpu", "base_mb")}
    t["rss_mb"] = vmhwm_mb()
    s_corr = r["s_corr"]
    usable = ~r["nodata"] & np.isfinite(s_corr)
    scale = float(mad_sigma(s_corr[usable]))
    t["note"] = f"its S_corr / {scale:.3g} (robust scatter) as the score"
    score = np.where(usable, s_corr / scale, 0.0).astype(np.float32)
    return _peer_exposure(r["d"], mask, size), score, t


def sub_sfft(a: dict, size: int):
    import contextlib
    import io

    from archive.image import mask as maskmod
    from sfft.sfftcore.SFFTConfigure import SingleSFFTConfigure
    from sfft.sfftcore.SFFTSubtract import GeneralSFFTSubtract

    from archive.process.warp import fill_masked

    mask = _union_mask(a)
    cr = (a["sci_mask"] & (1 << maskmod.CR)) != 0
    nodata = (a["tpl_mask"] & (1 << maskmod.NO_DATA)) != 0
    sci = fill_masked(a["sci_image"], cr).astype(np.float64)
    tpl = a["tpl_image"].astype(np.float64)
    a.clear()
    # sfft's arrays are FITS data transposed (NX, NY)
    ref_t, sci_t = np.ascontiguousarray(tpl.T), np.ascontiguousarray(sci.T)
    bad_t = np.ascontiguousarray((cr | nodata).T)
    mref_t, msci_t = np.where(bad_t, 0.0, ref_t), np.where(bad_t, 0.0, sci_t)
    del sci, tpl
    threads = os.cpu_count() or 1
    log = io.StringIO()

    def run():
        with contextlib.redirect_stdout(log):
            t0 = time.perf_counter()
            cfg = SingleSFFTConfigure.SSC(NX=size, NY=size, KerHW=SFFT_KER_HW, KerPolyOrder=SFFT_POLY, BGPolyOrder=SFFT_POLY,
                                          ConstPhotRatio=True, BACKEND_4SUBTRACT="Numpy",
                                          NUM_CPU_THREADS_4SUBTRACT=threads, NUMBA_CACHE=True, VERBOSE_LEVEL=0)
            t_cfg = time.perf_counter() - t0
            out = GeneralSFFTSubtract.GSS(PixA_I=ref_t, PixA_J=sci_t, PixA_mI=mref_t, PixA_mJ=msci_t,
                                          SFFTConfig=cfg, ContamMask_I=None, BACKEND_4SUBTRACT="Numpy",
                                          NUM_CPU_THREADS_4SUBTRACT=threads, VERBOSE_LEVEL=0)
        return out[1], t_cfg

    (diff_t, t_cfg), t = _timed(run)
    diff = np.ascontiguousarray(diff_t.T)  # ForceConv REF: science - convolved template
    diff[nodata] = np.nan
    t["note"] = (f"configure (numba, cached) {t_cfg:.2f} s + subtract {t['wall'] - t_cfg:.2f} s; "
                 f"kernel half-width {SFFT_KER_HW}, polynomial orders {SFFT_POLY}, {threads} threads; generic score")
    exp = _peer_exposure(diff, mask, size)
    return exp, generic_score(exp), t


METHODS = {"al": sub_al, "zogy": sub_zogy, "properimage": sub_properimage, "sfft": sub_sfft}
#: Our methods also get a row with the generic score (like-for-like with sfft).
GENERIC_TOO = ("al", "zogy")


# --------------------------------------------------------------------------- one detection for all

def _usable(diff) -> np.ndarray:
    no_data = (diff.mask & diff.get_plane_bitmask("NO_DATA")) != 0
    return ~no_data & np.isfinite(diff.variance)


def generic_score(diff) -> np.ndarray:
    """The difference filtered with its PSF (at the centre) over the robust scatter of that:
    a score in sigma for a difference whose variance plane is not trusted."""
    from scipy import signal

    from archive.process.robust import mad_sigma

    ny, nx = diff.shape
    k = diff.psf.kernel((nx - 1) / 2.0, (ny - 1) / 2.0, None)
    usable = _usable(diff)
    num = signal.oaconvolve(np.where(usable, diff.image, 0.0).astype(np.float32), k[::-1, ::-1].astype(np.float32),
                            mode="same")
    scale = float(mad_sigma(num[usable]))
    return np.where(usable, num / scale, 0.0).astype(np.float32)


def dia_detect(diff, score: np.ndarray) -> dict:
    """This project's detect_dia_sources; positions and the sign of the score at each."""
    from archive.process.diffim.detection import detect_dia_sources

    t0 = time.perf_counter()
    src = detect_dia_sources(diff, score)
    x, y = src["x"].to_numpy(float), src["y"].to_numpy(float)
    ix = np.clip(np.round(x).astype(int), 0, diff.shape[1] - 1)
    iy = np.clip(np.round(y).astype(int), 0, diff.shape[0] - 1)
    return {"x": x.tolist(), "y": y.tolist(), "sign": np.sign(score[iy, ix]).tolist(),
            "detect_s": time.perf_counter() - t0}


def sweep(diff, score: np.ndarray) -> dict:
    """The detection step of detect_dia_sources (its positions: every one becomes a row) at
    each threshold of SWEEP, for the false positives at equal completeness."""
    from archive.process.diffim.detection import DetectionConfig, find_dia_peaks

    out = {}
    for t in SWEEP:
        xy, sign = find_dia_peaks(diff, score, DetectionConfig(threshold=float(t)))
        out[f"{t:g}"] = {"x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(), "sign": sign.tolist()}
    return out


def detect_all(diff, score: np.ndarray) -> dict:
    out = dia_detect(diff, score)
    out["sweep"] = sweep(diff, score)
    return out


def child(method: str, work: pathlib.Path, size: int, profile: bool) -> None:
    a = _load(work)
    if profile:
        import cProfile
        import pstats

        import archive.process.diffim.alard_lupton  # noqa: F401  (imports outside the profile)
        import archive.process.diffim.detection  # noqa: F401
        import archive.process.diffim.zogy  # noqa: F401

        os.environ["BENCH_ZOGY_THREADS"] = "1"
        prof = cProfile.Profile()
        prof.enable()
        _, _, t = METHODS[method](a, size)
        prof.disable()
        path = work / f"profile_{method}.prof"
        prof.dump_stats(str(path))
        print(f"--- cProfile of {method} on {size}^2 ({t['wall']:.2f} s under the profiler) -> {path}")
        for key in ("cumulative", "tottime"):
            pstats.Stats(prof).sort_stats(key).print_stats(22)
        return
    diff, score, t = METHODS[method](a, size)
    out = {"timing": t, "runs": {method: detect_all(diff, score)}}
    if method in GENERIC_TOO:
        out["runs"][f"{method}/generic"] = detect_all(diff, generic_score(diff))
    (work / f"diffim_{method}.json").write_text(json.dumps(out))
    (work / f"kept_{method}.json").write_text(json.dumps(out))  # for --rescore


# --------------------------------------------------------------------------- scoring

def at_completeness(work: pathlib.Path, size: int, det: dict, target: float) -> dict:
    """False positives at the highest swept threshold whose completeness reaches ``target``."""
    best = None
    for t, d in sorted(det.get("sweep", {}).items(), key=lambda kv: float(kv[0])):
        sc = score(work, size, d)
        if sc["complete"] >= target:
            best = dict(sc, threshold=float(t))
    return best or {"threshold": float("nan"), "fp": -1, "fp_away": -1, "complete": float("nan")}


def score(work: pathlib.Path, size: int, det: dict) -> dict:
    from scipy.spatial import cKDTree

    t = np.load(work / "truth.npz")
    x, y, sg = np.asarray(det["x"]), np.asarray(det["y"]), np.asarray(det["sign"])
    lo, hi = BORDER, size - 1 - BORDER

    def inside(px, py):
        return (px >= max(lo, X_MIN)) & (px <= hi) & (py >= lo) & (py <= hi)

    keep = inside(x, y)
    x, y, sg = x[keep], y[keep], sg[keep]
    snr = np.abs(t["dflux"]) / t["err"]
    sel = inside(t["cx"], t["cy"]) & (snr >= SNR_MIN)
    found = np.zeros(len(snr), bool)
    fp = np.ones(len(x), bool)
    offset = np.zeros(len(x), bool)
    near_bright = np.zeros(len(x), bool)
    if len(x):
        tree = cKDTree(np.c_[x, y])
        for i, idx in enumerate(tree.query_ball_point(np.c_[t["cx"], t["cy"]], MATCH_PX)):
            found[i] = any(sg[j] == np.sign(t["dflux"][i]) for j in idx)
        d, _ = cKDTree(np.c_[t["cx"], t["cy"]]).query(np.c_[x, y])
        fp = d > MATCH_PX
        offset = fp & (d <= OFFSET_PX)
        bright = t["sf"] > BRIGHT_FLUX
        d2, _ = cKDTree(np.c_[t["sx"][bright], t["sy"][bright]]).query(np.c_[x, y])
        near_bright = d2 <= BRIGHT_FWHM * 3.6
    return {"complete": float(found[sel].mean()) if sel.any() else float("nan"), "n_sel": int(sel.sum()),
            "n_found": int(found[sel].sum()), "fp": int(fp.sum()), "fp_away": int((fp & ~near_bright).sum()),
            "fp_offset": int(offset.sum()), "n_det": int(len(x))}


# --------------------------------------------------------------------------- driver

def installed(method: str) -> bool:
    import importlib.util

    return method not in PEERS or importlib.util.find_spec(PEERS[method]) is not None


def _limit_memory(gib: float):
    """preexec_fn: cap the child's address space (a peer that outgrows the machine fails alone)."""
    def f():
        import resource

        lim = int(gib * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    return f if gib > 0 else None


def run_child(method: str, work: pathlib.Path, size: int, timeout: float | None, profile: bool = False,
              mem_gib: float = 0.0):
    cmd = [sys.executable, __file__, "--child", method, "--workdir", str(work), "--size", str(size)]
    if profile:
        cmd.append("--profile-child")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=_limit_memory(mem_gib))
    except subprocess.TimeoutExpired:
        return None, f"no result within {timeout:.0f} s (killed)"
    if profile:
        return p.stdout, None if p.returncode == 0 else p.stderr[-2000:]
    f = work / f"diffim_{method}.json"
    if p.returncode != 0 or not f.exists():
        return None, f"failed (exit {p.returncode}): {' | '.join(p.stderr.strip().splitlines()[-3:])}"
    out = json.loads(f.read_text())
    f.unlink()
    out["process_s"] = time.perf_counter() - t0
    return out, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--methods", default="al,zogy,properimage,sfft")
    ap.add_argument("--workdir", default="/tmp/bench_diffim")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peer-timeout", type=float, default=900.0, help="seconds allowed to a peer per pair")
    ap.add_argument("--peer-mem-gib", type=float, default=14.0,
                    help="address-space cap of a peer's process (0: none)")
    ap.add_argument("--target-completeness", type=float, default=0.95,
                    help="completeness at which the false positives are compared (threshold swept)")
    ap.add_argument("--sfft-kerhw", type=int, default=8, help="sfft's kernel half-width (px)")
    ap.add_argument("--sfft-poly", type=int, default=1,
                    help="sfft's KerPolyOrder and BGPolyOrder (its default 2 needs > 20 GiB at 2048^2 on the CPU)")
    ap.add_argument("--profile", default="", help="methods of the project to run once under cProfile")
    ap.add_argument("--profile-size", type=int, default=4096)
    ap.add_argument("--prewarm-gib", type=float, default=2.0)
    ap.add_argument("--rescore", action="store_true",
                    help="run nothing: score the last run's results again (kept_*.json), e.g. at another "
                         "--target-completeness")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--profile-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, pathlib.Path(args.workdir), args.size, args.profile_child)
        return
    os.environ["BENCH_SFFT_KERHW"] = str(args.sfft_kerhw)
    os.environ["BENCH_SFFT_POLY"] = str(args.sfft_poly)
    if not args.rescore:
        prewarm_memory(args.prewarm_gib)
    methods = [m for m in args.methods.split(",") if m]
    print(machine_line(), f"git={git_rev()}")
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "archive/process/diffim"], capture_output=True,
                           text=True, cwd=ROOT).stdout.split()[1::2]
    for f in dirty:  # the code measured is the working tree's: say which files differ from the commit
        blob = subprocess.run(["git", "hash-object", f], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        print(f"  working tree: {f} modified (blob {blob[:10]})")
    for m in methods:
        if not installed(m):
            print(f"{m}: NOT INSTALLED, skipped (see /work/shared/PEERS.md: bench-only peer)")
    methods = [m for m in methods if installed(m)]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for size in sizes:
        work = pathlib.Path(args.workdir) / f"pair{size}"
        prepare(work, size, args.seed)
        meta = json.loads((work / "meta.json").read_text())
        print(f"\n== {size} x {size} pair (background-limited PSF-flux error on the difference "
              f"{meta['err_bg']:.1f} nJy); load at start {os.getloadavg()[0]:.2f} ==")
        rows, notes = [], []
        for m in methods:
            load0 = os.getloadavg()[0]
            if args.rescore:
                kept = work / f"kept_{m}.json"
                out, err = (json.loads(kept.read_text()), None) if kept.exists() else (None, "no kept result")
            else:
                (work / f"kept_{m}.json").unlink(missing_ok=True)
                out, err = run_child(m, work, size, args.peer_timeout if m in PEERS else None,
                                     mem_gib=args.peer_mem_gib if m in PEERS else 0.0)
            if out is None:
                print(f"{m}: {err}")
                rows.append((m, None, None, load0))
                continue
            t = out["timing"]
            notes.append(f"  {m}: {t['note']}; process {out.get('process_s', float('nan')):.1f} s in all; load at start {load0:.2f}")
            for name, det in out["runs"].items():
                sc = score(work, size, det)
                sc["eq"] = at_completeness(work, size, det, args.target_completeness)
                rows.append((name, t, sc, load0))
            print(f"  done {m}: {t['wall']:.2f} s", flush=True)
        hdr = (f"{'method':<18} {'wall s':>8} {'CPU s':>7} {'peak RSS MB':>11} {'+ inputs':>8} "
               f"{'complete S/N>=7':>17} {'FP all':>7} {'FP away':>8} {'FP 1-3px':>8} {'detections':>10}   "
               f"at completeness >= {args.target_completeness:g}: threshold, complete, FP all, FP away")
        print(hdr)
        for name, t, sc, _ in rows:
            if t is None:
                print(f"{name:<18} {'--':>8}")
                continue
            print(f"{name:<18} {t['wall']:>8.2f} {t['cpu']:>7.2f} {t['rss_mb']:>11.0f} "
                  f"{t['rss_mb'] - t['base_mb']:>8.0f} {sc['complete']:>7.3f} ({sc['n_found']:>3}/{sc['n_sel']:>3}) "
                  f"{sc['fp']:>7d} {sc['fp_away']:>8d} {sc['fp_offset']:>8d} {sc['n_det']:>10d}   "
                  f"{sc['eq']['threshold']:>5.1f} {sc['eq']['complete']:.3f} {sc['eq']['fp']:>6d} {sc['eq']['fp_away']:>6d}")
        print("\n".join(notes))
    for m in (p for p in args.profile.split(",") if p and not args.rescore):
        work = pathlib.Path(args.workdir) / f"pair{args.profile_size}"
        prepare(work, args.profile_size, args.seed)
        print(f"\n== cProfile: {m}, {args.profile_size}^2, load {os.getloadavg()[0]:.2f} ==")
        text, err = run_child(m, work, args.profile_size, None, profile=True)
        print(text if text else err)


if __name__ == "__main__":
    main()
