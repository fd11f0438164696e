"""Benchmark: ZOGY subtraction (archive.process.diffim.zogy) of a 2048^2 and a 4096^2 pair,
beside properimage (PyPI, Sanchez et al.'s ZOGY) on the same pair in the same run.

    python bench/bench_zogy.py [--sizes 2048,4096] [--tools zogy,zogy-1thread,properimage]
                               [--repeat 3] [--workdir /tmp/bench_zogy] [--peer-timeout 1800]

The pair is made here with numpy (seeded): a science image and a deeper, sharper template
on one grid, Moffat PSFs whose FWHM changes over the image (science 3.6 px +-8 %, beta 3;
template 2.7 px +-7 %, beta 3.5, varying differently), background sigma 10 and 6 nJy/px,
Poisson-like source noise (variance = sky + flux, "gain" 1/nJy), 300 stars per 1024^2
(200 .. 3e5 nJy, log-uniform), and the changes: 40 transients per 1024^2 in the science
only (150 .. 4000 nJy) and 10 variable stars per 1024^2 that brightened or faded (by 300 ..
3000 nJy), plus 60 cosmic rays per 1024^2 in the science (masked CR) and a 64 px NO_DATA
strip along the template's left edge.  ZOGY gets the true PSFs; properimage measures its
own (its ``SingleImageGaussPSF``: a Gaussian fitted to stars it finds with SEP), is given
the images in counts (the sky level added back: it models the noise as Poisson counts +
1) with the masks, and runs with ``beta=False, shift=False`` (the flux ratio is 1, the
registration exact) -- its fastest mode.

Each tool runs in a fresh subprocess (zogy ``--repeat`` times, properimage once, with a
time limit); the table gives the wall time of the subtraction call (median and range),
its CPU time, the peak resident memory of the process (VmHWM) and its increase over the
inputs' footprint, and detections against the truth: local maxima (5 x 5) of |score| > 5
away from NO_DATA and the 8 px border.  properimage's S_corr does not come out in sigma
(its transforms are orthonormalised, which rescales the PSF's), so its detections use
S_corr divided by its own robust (MAD) scatter; the raw count is also given.
Completeness: changes of true S/N >= 7 (|change| over the PSF-flux error on the difference:
background, plus a variable star's own Poisson noise) with a detection of the same sign
within 2.5 px.  False positives:
detections with no change within 3 px, split into those within 10 px of a star brighter
than 3e4 nJy and the rest.  The Gaussian expectation of 5-sigma noise peaks (both signs)
for the image's score smoothness is printed beside them.  Not run as a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import vmhwm_mb as _vmhwm_mb, vmrss_mb as _vmrss_mb  # noqa: E402

SIG_N, SIG_R = 10.0, 6.0
PSF_N = {"fwhm": 3.6, "beta": 3.0, "variation": [0.05, 0.03]}
PSF_R = {"fwhm": 2.7, "beta": 3.5, "variation": [-0.03, 0.04]}


def psfs(size: int):
    from archive.image.psf import MoffatPSF

    bb = (0.0, 0.0, size - 1.0, size - 1.0)
    return (MoffatPSF(PSF_N["fwhm"], beta=PSF_N["beta"], variation=PSF_N["variation"], bbox=bb),
            MoffatPSF(PSF_R["fwhm"], beta=PSF_R["beta"], variation=PSF_R["variation"], bbox=bb))


def prepare(work: pathlib.Path, size: int, seed: int) -> None:
    """Make the pair and its truth; saved as .npy / .npz under ``work`` (skipped if done)."""
    from archive.image import mask as maskmod
    from archive.image.psf import add_point_sources

    if (work / "done").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    area = (size / 1024.0) ** 2
    pn, pr = psfs(size)
    n_star, n_tr, n_var, n_cr = (int(round(k * area)) for k in (300, 40, 10, 60))
    sx, sy = rng.uniform(4, size - 5, (2, n_star))
    sf = np.exp(rng.uniform(np.log(200.0), np.log(3e5), n_star))
    tx, ty = rng.uniform(10, size - 11, (2, n_tr))
    tf = np.exp(rng.uniform(np.log(150.0), np.log(4000.0), n_tr))
    vi = rng.choice(n_star, n_var, replace=False)
    vd = np.exp(rng.uniform(np.log(300.0), np.log(3000.0), n_var)) * rng.choice([-1.0, 1.0], n_var)
    vd = np.maximum(vd, -0.9 * sf[vi])  # a star cannot fade below nothing
    sci_flux = sf.copy()
    sci_flux[vi] += vd
    mn = np.zeros((size, size))
    add_point_sources(mn, pn, np.r_[sx, tx], np.r_[sy, ty], np.r_[sci_flux, tf])
    mr = np.zeros((size, size))
    add_point_sources(mr, pr, sx, sy, sf)
    vn = SIG_N ** 2 + np.maximum(mn, 0)
    vr = SIG_R ** 2 + np.maximum(mr, 0)
    n_img = (mn + rng.standard_normal(mn.shape) * np.sqrt(vn)).astype(np.float32)
    r_img = (mr + rng.standard_normal(mr.shape) * np.sqrt(vr)).astype(np.float32)
    n_mask = np.zeros((size, size), np.int32)
    r_mask = np.zeros((size, size), np.int32)
    cy, cx = rng.integers(0, size, (2, n_cr))
    n_img[cy, cx] += rng.uniform(2e3, 2e4, n_cr).astype(np.float32)
    n_mask[cy, cx] |= 1 << maskmod.CR
    r_img[:, :64] = 0.0
    vr[:, :64] = np.inf
    r_mask[:, :64] |= 1 << maskmod.NO_DATA
    for name, arr in (("sci_image", n_img), ("sci_var", vn), ("sci_mask", n_mask), ("tpl_image", r_img),
                      ("tpl_var", vr), ("tpl_mask", r_mask)):
        np.save(work / f"{name}.npy", arr.astype(np.float32) if arr.dtype.kind == "f" else arr)
    # truth: the changes, and their background-limited S/N on the difference (P_D at the centre)
    ks = 41
    kn, kr = pn.kernel(size / 2, size / 2, ks), pr.kernel(size / 2, size / 2, ks)
    s = SIG_N ** 2 + SIG_R ** 2
    g = 128

    def ft(k):
        z = np.zeros((g, g))
        z[:ks, :ks] = k
        return np.fft.fft2(np.roll(z, (-(ks // 2), -(ks // 2)), axis=(0, 1)))

    fn, fr = ft(kn), ft(kr)
    pd = np.fft.ifft2(fr * fn / np.sqrt(SIG_N ** 2 / s * np.abs(fr) ** 2 + SIG_R ** 2 / s * np.abs(fn) ** 2)).real
    pd /= pd.sum()
    p2, p3 = float((pd ** 2).sum()), float((np.abs(pd) ** 3).sum())
    err = math.sqrt(s / p2)
    # a variable star's own Poisson noise (science + template light) adds to its change's error
    src = np.r_[np.zeros(n_tr), sci_flux[vi] + sf[vi]] * p3 / p2 ** 2
    np.savez(work / "truth.npz", cx=np.r_[tx, sx[vi]], cy=np.r_[ty, sy[vi]], dflux=np.r_[tf, vd],
             err=np.sqrt(err ** 2 + src),
             kind=np.r_[np.zeros(n_tr, int), np.ones(n_var, int)], sx=sx, sy=sy, sf=sf, crx=cx, cry=cy)
    # smoothness of the score for the Gaussian expectation of noise peaks: var(dS/dx) / var(S)
    spec = np.abs(np.fft.fft2(pd)) ** 2
    fx = np.fft.fftfreq(g)[None, :]
    lam = float(((2 * np.pi * fx) ** 2 * spec).sum() / spec.sum())
    (work / "meta.json").write_text(json.dumps({"size": size, "seed": seed, "err_bg": err, "lambda": lam,
                                                "prepare_s": time.perf_counter() - t0}))
    (work / "done").write_text("ok")


def detect(score: np.ndarray, bad: np.ndarray, threshold: float = 5.0, border: int = 8):
    """Local maxima (5x5) of |score| above threshold: x, y, signed peak value."""
    from scipy import ndimage

    valid = ~bad
    valid[:border] = valid[-border:] = False
    valid[:, :border] = valid[:, -border:] = False
    out = []
    for sign in (1.0, -1.0):
        s = sign * score
        pk = (s == ndimage.maximum_filter(s, size=5)) & (s > threshold) & valid
        y, x = np.nonzero(pk)
        out.append((x, y, sign * s[y, x]))
    return (np.concatenate([o[0] for o in out]).astype(float), np.concatenate([o[1] for o in out]).astype(float),
            np.concatenate([o[2] for o in out]).astype(float))


def _load(work: pathlib.Path):
    return {n: np.load(work / f"{n}.npy") for n in ("sci_image", "sci_var", "sci_mask", "tpl_image", "tpl_var",
                                                    "tpl_mask")}


def run_zogy(work: pathlib.Path, threads: int) -> dict:
    from archive.image.exposure import Exposure
    from archive.process.diffim.zogy import ZogyConfig, zogy_difference

    a = _load(work)
    size = a["sci_image"].shape[0]
    pn, pr = psfs(size)
    sci = Exposure(a["sci_image"], a["sci_mask"], a["sci_var"], psf=pn)
    tpl = Exposure(a["tpl_image"], a["tpl_mask"], a["tpl_var"], psf=pr)
    del a
    base = _vmrss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    res = zogy_difference(sci, tpl, ZogyConfig(threads=threads))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    x, y, v = detect(res.score, res.difference.mask_of("NO_DATA"))
    m = res.metadata
    return {"wall": wall, "cpu": cpu, "base_mb": base, "x": x.tolist(), "y": y.tolist(), "v": v.tolist(),
            "note": f"{m['n_subimages']} cores, FFT {m['fft_shape']}, kernel {m['kernel_size']}, "
                    f"{m['refined_pixels']} masked pixels re-solved, threads {threads or os.cpu_count()}"}


def properimage_subtract(a: dict) -> dict:
    """properimage's ZOGY on the arrays of :func:`_load` (consumed): images in counts (the sky
    level added back: it models the noise as Poisson counts), masks as masked arrays,
    ``beta=False, shift=False``.  Returns D, P_D, S_corr (float64), the NO_DATA pixels, the
    call's wall and CPU seconds and the RSS before it (MB)."""
    import logging

    logging.disable(logging.WARNING)
    from properimage.operations import subtract

    new = np.ma.MaskedArray(a["sci_image"].astype(np.float64) + SIG_N ** 2, mask=a["sci_mask"] != 0)
    ref = np.ma.MaskedArray(a["tpl_image"].astype(np.float64) + SIG_R ** 2, mask=a["tpl_mask"] != 0)
    nodata = (a["tpl_mask"] != 0) & (a["tpl_image"] == 0)
    a.clear()
    base = _vmrss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    d, p, s_corr, _mix_mask = subtract(ref=ref, new=new, align=False, fitted_psf=True, beta=False, shift=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"d": np.asarray(d, dtype=np.float64), "p": np.asarray(p, dtype=np.float64),
            "s_corr": np.asarray(s_corr, dtype=np.float64), "nodata": nodata, "wall": wall, "cpu": cpu,
            "base_mb": base}


def run_properimage(work: pathlib.Path) -> dict:
    from archive.process.robust import mad_sigma

    r = properimage_subtract(_load(work))
    s_corr, nodata = r["s_corr"], r["nodata"]
    raw = detect(s_corr, nodata)
    scale = float(mad_sigma(s_corr[~nodata]))
    x, y, v = detect(s_corr / scale, nodata)
    return {"wall": r["wall"], "cpu": r["cpu"], "base_mb": r["base_mb"], "x": x.tolist(), "y": y.tolist(),
            "v": v.tolist(),
            "note": f"S_corr robust scatter {scale:.3g} (detections on S_corr / that; "
                    f"{len(raw[0])} at |S_corr| > 5 as returned)"}


TOOLS = {"zogy": lambda w: run_zogy(w, 0), "zogy-1thread": lambda w: run_zogy(w, 1), "properimage": run_properimage}


def child(tool: str, work: pathlib.Path) -> None:
    out = TOOLS[tool](work)
    out["rss_mb"] = _vmhwm_mb()
    (work / f"result_{tool}.json").write_text(json.dumps(out))


def score(work: pathlib.Path, res: dict) -> dict:
    from scipy.spatial import cKDTree

    t = np.load(work / "truth.npz")
    meta = json.loads((work / "meta.json").read_text())
    x, y, v = np.asarray(res["x"]), np.asarray(res["y"]), np.asarray(res["v"])
    snr = np.abs(t["dflux"]) / t["err"]
    size = meta["size"]
    inside = (t["cx"] > 72) & (t["cx"] < size - 9) & (t["cy"] > 8) & (t["cy"] < size - 9)  # off NO_DATA, border
    found = np.zeros(len(snr), bool)
    if len(x):
        tree = cKDTree(np.c_[x, y])
        for i, idx in enumerate(tree.query_ball_point(np.c_[t["cx"], t["cy"]], 2.5)):
            found[i] = any(np.sign(v[j]) == np.sign(t["dflux"][i]) for j in idx)
    sel = inside & (snr >= 7)
    mid = inside & (snr >= 5) & (snr < 7)
    fp = np.ones(len(x), bool)
    near_bright = np.zeros(len(x), bool)
    if len(x):
        d, _ = cKDTree(np.c_[t["cx"], t["cy"]]).query(np.c_[x, y])
        fp = d > 3.0
        bright = t["sf"] > 3e4
        d2, _ = cKDTree(np.c_[t["sx"][bright], t["sy"][bright]]).query(np.c_[x, y])
        near_bright = d2 <= 10.0
    edge = x < 64 + 20  # beside the template's NO_DATA strip: stars cut by it leave residuals there
    area = (size - 72 - 9) * (size - 17)
    expect = 2 * area * meta["lambda"] * 5.0 * math.exp(-12.5) / (2 * math.pi) ** 1.5
    return {"complete": float(found[sel].mean()), "n_sel": int(sel.sum()), "complete_5_7": float(found[mid].mean()),
            "n_mid": int(mid.sum()), "fp": int(fp.sum()), "fp_bright": int((fp & near_bright).sum()),
            "fp_other": int((fp & ~near_bright).sum()), "fp_edge": int((fp & edge).sum()),
            "fp_pos": int((fp & (v > 0)).sum()),
            "fp_neg": int((fp & (v < 0)).sum()), "n_det": int(len(x)), "noise_expect": expect}


def prewarm_memory(gib: float) -> None:
    """Touch ``gib`` GiB once and free it (the VM backs guest pages lazily: see bench_detect)."""
    a = np.ones(int(gib * 2 ** 30) // 8)
    del a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--tools", default="zogy,zogy-1thread,properimage")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each zogy variant (fresh processes)")
    ap.add_argument("--workdir", default="/tmp/bench_zogy")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds allowed to properimage per pair")
    ap.add_argument("--prewarm-gib", type=float, default=2.0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, pathlib.Path(args.workdir))
        return
    prewarm_memory(args.prewarm_gib)
    tools = [t for t in args.tools.split(",") if t]
    print(f"nproc = {os.cpu_count()}, load average at start {os.getloadavg()[0]:.1f}")
    for size in (int(s) for s in args.sizes.split(",")):
        work = pathlib.Path(args.workdir) / f"pair{size}"
        prepare(work, size, args.seed)
        meta = json.loads((work / "meta.json").read_text())
        print(f"\n== {size} x {size} pair (made in {meta.get('prepare_s', float('nan')):.1f} s; background-limited "
              f"PSF-flux error on the difference {meta['err_bg']:.1f} nJy) ==")
        rows = []
        for tool in tools:
            runs = args.repeat if tool.startswith("zogy") else 1
            results = []
            for _ in range(runs):
                cmd = [sys.executable, __file__, "--child", tool, "--workdir", str(work)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True,
                                       timeout=None if tool.startswith("zogy") else args.peer_timeout)
                except subprocess.TimeoutExpired:
                    results = None
                    print(f"{tool}: no result within {args.peer_timeout:.0f} s")
                    break
                f = work / f"result_{tool}.json"
                if p.returncode != 0 or not f.exists():
                    results = None
                    print(f"{tool}: failed (exit {p.returncode}): {p.stderr.strip().splitlines()[-3:]}")
                    break
                results.append(json.loads(f.read_text()))
                f.rename(work / f"result_{tool}_{len(results)}.json")
            if not results:
                rows.append((tool, None, None))
                continue
            walls = [r["wall"] for r in results]
            rows.append((tool, results, score(work, results[len(results) // 2])))
            del walls
        print(f"{'tool':<13} {'wall s (median, range)':>24} {'CPU s':>7} {'peak RSS MB':>11} {'+ over inputs':>13} "
              f"{'complete S/N>=7':>16} {'5<=S/N<7':>9} {'false pos.':>10} {'near bright':>11} {'elsewhere':>9}")
        for tool, results, sc in rows:
            if results is None:
                print(f"{tool:<13} {'--':>24}")
                continue
            w = sorted(r["wall"] for r in results)
            med = w[len(w) // 2]
            r = results[len(results) // 2]
            rng = f"{med:.2f} ({w[0]:.2f}-{w[-1]:.2f})" if len(w) > 1 else f"{med:.2f}"
            print(f"{tool:<13} {rng:>24} {r['cpu']:>7.2f} {r['rss_mb']:>11.0f} {r['rss_mb'] - r['base_mb']:>13.0f} "
                  f"{sc['complete']:>9.3f} ({sc['n_sel']:>4}) {sc['complete_5_7']:>9.3f} {sc['fp']:>10d} "
                  f"{sc['fp_bright']:>11d} {sc['fp_other']:>9d}")
        for tool, results, sc in rows:
            if results is not None:
                print(f"  {tool}: {results[len(results) // 2]['note']}; false positives +{sc['fp_pos']} / "
                      f"-{sc['fp_neg']}, {sc['fp_edge']} of them within 20 px of the NO_DATA strip; Gaussian "
                      f"expectation of 5-sigma noise peaks {sc['noise_expect']:.1f}")


if __name__ == "__main__":
    main()
