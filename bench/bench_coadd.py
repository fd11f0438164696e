"""Benchmark: a coadd of 8 epochs of 2048 x 2048 onto one sky tile, beside SWarp and reproject.

The epochs are made here with numpy, with a known truth: a tile-sized TAN grid (0.2"/px),
epochs dithered by up to +-60 px and rotated by up to +-0.3 deg, each with its own seeing
(Gaussian PSF, FWHM 2.6-3.6 px) and sky noise (sigma 9-12 counts, sky subtracted; the
variance plane is sky + stars).  On it: ``--stars`` static stars (power-law fluxes, 200 to
2e5 counts), 25 isolated variable stars (1e4-4e4 counts, +-50% sinusoids of random phase)
and 25 isolated constant stars of the same fluxes (the control), and artifacts, none of them
masked: ~400 cosmic rays per epoch (1-4 px, 1e3-2e4 counts per pixel), a satellite streak
across epoch 4 (peak 200 counts), 10 transients seen in epoch 2 only (2e4 counts) and 3
moving objects (2e4 counts, 80 px per epoch).

Tools, each in a fresh subprocess (wall time including reading the inputs from FITS and
writing the coadd; peak RSS: VmHWM of the process, or of SWarp), in the same run:

* ``archive``: per epoch :func:`archive.process.warp.warp_exposure` (Lanczos-3) and
  :func:`~archive.process.warp.psf_match`, then :func:`archive.process.coadd.find_artifacts`
  (CompareWarp) and :func:`~archive.process.coadd.combine`, as the ``coadd`` step runs them;
  on 2 threads the epochs are read, warped and PSF-matched two at a time (as the runner's
  two workers warp two exposures at once), and rejection (row strips, then epochs) and the
  background pairs of ``combine`` run on 2 threads (their ``threads`` argument).
* ``swarp-clipped``, ``swarp-median``: SWarp (Debian ``swarp``; ``SWarp`` on PATH),
  LANCZOS3, COMBINE_TYPE CLIPPED (its defaults: CLIP_SIGMA 4, CLIP_AMPFRAC 0.3; GAIN_DEFAULT 1,
  the field's gain: without a gain SWarp's clipping rejects nothing) or MEDIAN,
  constant weight maps 1/sigma_e^2 per epoch (MAP_WEIGHT), no background subtraction,
  the tile grid from a ``.head`` file, NTHREADS 1 or 2.
* ``reproject``: ``reproject.reproject_interp`` (bicubic: reproject has no Lanczos) of each
  epoch onto the tile (``parallel`` = threads when 2), then astropy ``sigma_clip`` (3 sigma,
  median centre, 5 iterations) along the stack and the 1/sigma_e^2 weighted mean of what is
  kept.  ``mean (no rejection)``, the weighted mean of the same stack, is shown as the
  count of artifact pixels there are to reject (not timed).

Measured on each coadd, on the tile pixels every epoch covers:

* noise: the robust (MAD) sd of empty pixels and the sd of sums in r = 4 px apertures at
  empty places, over the ideal 1 / sqrt(sum 1/sigma_e^2) (per pixel; times sqrt(n_pix)
  for apertures).  Resampling correlates pixels, so the per-pixel figure is below 1 for
  every tool; the aperture one is what measurements see.  For archive also the aperture sd
  over what its variance plane predicts (SWarp and reproject give no variance plane).
* artifacts left: pixels of the artifacts' footprints (cosmic rays: 3 x 3 around each hit
  pixel; the streak: within 2 px of its line; transients and movers: within 4 px), away
  from static-star light (true static light < 1 sigma), above 5 sigma (the tool's own empty
  pixel sd) in the coadd.
* variable flux clipped: the r = 8 px aperture flux of each variable star over the
  weighted mean of its true fluxes (the constant stars' ratio is the control: what the
  resampling and aperture alone do).

    python bench/bench_coadd.py [--size 2048] [--epochs 8] [--threads 1,2] [--tools ...] [--workdir DIR]

Not run as a test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PIX = 0.2 / 3600.0
RA0, DEC0 = 150.0, 2.0
TOOLS = ("archive", "swarp-clipped", "swarp-median", "reproject")
STAGES: dict[str, float] = {}  # a worker's stage times (archive)


def peak_rss_mb(pid: str = "self") -> float:
    """VmHWM of a process (MB): its own peak RSS (ru_maxrss of a process started by a large
    parent can report the parent's size: Linux keeps it across fork and exec)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def tan_wcs(nx: int, ny: int, dx: float = 0.0, dy: float = 0.0, rot_deg: float = 0.0):
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [RA0, DEC0]
    w.wcs.crpix = [nx / 2 + 0.5 + dx, ny / 2 + 0.5 + dy]
    t = math.radians(rot_deg)
    w.wcs.cd = PIX * np.array([[-math.cos(t), math.sin(t)], [math.sin(t), math.cos(t)]])
    w.pixel_shape = (nx, ny)
    return w


def draw_gauss(img: np.ndarray, x, y, flux, sigma: float, half: int = 12) -> None:
    """Add pixel-integrated round Gaussians (erf) of ``flux`` at (x, y) to ``img`` in place."""
    from scipy.special import erf

    x, y, flux = (np.atleast_1d(np.asarray(a, float)) for a in (x, y, flux))
    ny, nx = img.shape
    off = np.arange(-half, half + 1)
    flat = img.reshape(-1)
    s2 = math.sqrt(2.0) * sigma
    for c in range(0, x.size, 4000):
        xs, ys, fs = x[c:c + 4000], y[c:c + 4000], flux[c:c + 4000]
        xc, yc = np.floor(xs + 0.5).astype(int), np.floor(ys + 0.5).astype(int)
        px = xc[:, None] + off[None]
        py = yc[:, None] + off[None]
        gx = 0.5 * (erf((px + 0.5 - xs[:, None]) / s2) - erf((px - 0.5 - xs[:, None]) / s2))
        gy = 0.5 * (erf((py + 0.5 - ys[:, None]) / s2) - erf((py - 0.5 - ys[:, None]) / s2))
        st = fs[:, None, None] * gy[:, :, None] * gx[:, None, :]
        ix = np.broadcast_to(px[:, None, :], st.shape)
        iy = np.broadcast_to(py[:, :, None], st.shape)
        ok = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        flat += np.bincount((iy[ok] * nx + ix[ok]), weights=st[ok], minlength=flat.size).astype(img.dtype)


# -- the field -------------------------------------------------------------------------------------
def make_field(wd: pathlib.Path, size: int, n_ep: int, n_stars: int, seed: int) -> dict:
    from archive.image.exposure import Exposure, ExposureInfo
    from archive.image.psf import FWHM_PER_SIGMA, GaussianPSF
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    tile = size + 192
    twcs = tan_wcs(tile, tile)
    # isolated variables and controls on a grid (30 px from anything else that is bright)
    g = np.linspace(0.07 * tile, 0.93 * tile, 8)
    gx, gy = (a.ravel() for a in np.meshgrid(g, g))
    pick = rng.permutation(gx.size)[:50]
    vx, vy = gx[pick] + rng.uniform(-0.01, 0.01, 50) * tile, gy[pick] + rng.uniform(-0.01, 0.01, 50) * tile
    vflux = rng.uniform(1e4, 4e4, 50)
    sx, sy = rng.uniform(0, tile, n_stars), rng.uniform(0, tile, n_stars)
    sflux = np.minimum(200.0 * rng.uniform(0, 1, n_stars) ** (-1 / 0.6), 2e5)
    far = np.min(np.hypot(sx[:, None] - vx[None], sy[:, None] - vy[None]), axis=1) > 30
    sx, sy, sflux = sx[far], sy[far], sflux[far]
    sx = np.concatenate([sx, vx[25:]])
    sy = np.concatenate([sy, vy[25:]])
    sflux = np.concatenate([sflux, vflux[25:]])
    n_const = sx.size
    control = np.arange(n_const - 25, n_const)
    vx, vy, vmean = vx[:25], vy[:25], vflux[:25]
    phase = rng.uniform(0, 2 * np.pi, 25)
    s_ra, s_dec = twcs.all_pix2world(sx, sy, 0)
    v_ra, v_dec = twcs.all_pix2world(vx, vy, 0)
    sig_e = rng.uniform(9.0, 12.0, n_ep)
    fwhm_e = np.linspace(2.6, 3.6, n_ep)[rng.permutation(n_ep)]
    vf = vmean[None] * (1 + 0.5 * np.sin(np.arange(n_ep)[:, None] * 1.1 + phase[None]))
    # transients (epoch 2), movers (every epoch), the streak (epoch 4), on the tile grid
    tx, ty = (rng.uniform(0.1 * tile, 0.9 * tile, 10) for _ in range(2))
    t_ra, t_dec = twcs.all_pix2world(tx, ty, 0)
    m0 = rng.uniform(0.25 * tile, 0.75 * tile, (3, 2))
    mdir = rng.normal(size=(3, 2))
    mdir /= np.hypot(*mdir.T)[:, None]
    streak = twcs.all_pix2world(np.array([0.0, tile - 1.0]), np.array([0.25 * tile, 0.7 * tile]), 0)
    cr_tile, mover_tile = [], []
    sw_files = []
    for e in range(n_ep):
        w = tan_wcs(size, size, *rng.uniform(-60, 60, 2), rot_deg=rng.uniform(-0.3, 0.3))
        sigma = fwhm_e[e] / FWHM_PER_SIGMA
        model = np.zeros((size, size), np.float64)
        x, y = w.all_world2pix(s_ra, s_dec, 0)
        draw_gauss(model, x, y, sflux, sigma)
        x, y = w.all_world2pix(v_ra, v_dec, 0)
        draw_gauss(model, x, y, vf[e], sigma)
        var = sig_e[e] ** 2 + np.clip(model, 0, None)
        art = np.zeros_like(model)
        if e == 2:
            x, y = w.all_world2pix(t_ra, t_dec, 0)
            draw_gauss(art, x, y, np.full(10, 2e4), sigma)
        mp = m0 + 80.0 * e * mdir
        mover_tile.append(mp)
        m_ra, m_dec = twcs.all_pix2world(mp[:, 0], mp[:, 1], 0)
        x, y = w.all_world2pix(m_ra, m_dec, 0)
        draw_gauss(art, x, y, np.full(3, 2e4), sigma)
        if e == 4:
            lx, ly = w.all_world2pix(*streak, 0)
            yy, xx = np.mgrid[0:size, 0:size]
            d = np.abs((lx[1] - lx[0]) * (ly[0] - yy) - (lx[0] - xx) * (ly[1] - ly[0])) / np.hypot(lx[1] - lx[0],
                                                                                                   ly[1] - ly[0])
            art += 200.0 * np.exp(-0.5 * (d / 1.3) ** 2)
            del yy, xx, d
        n_cr = int(rng.poisson(400 * (size / 2048) ** 2))
        cx, cy = rng.integers(0, size - 4, n_cr), rng.integers(0, size - 4, n_cr)
        length = rng.integers(1, 5, n_cr)
        direction = rng.integers(0, 3, n_cr)
        hits = []
        for i in range(n_cr):  # cosmic rays: a few hundred short tracks (not a loop over pixels)
            for t in range(length[i]):
                px, py = cx[i] + (t if direction[i] != 1 else 0), cy[i] + (t if direction[i] != 0 else 0)
                art[py, px] += rng.uniform(1e3, 2e4)
                hits.append((px, py))
        hx, hy = np.array(hits, float).T
        c_ra, c_dec = w.all_pix2world(hx, hy, 0)
        cr_tile.append(np.column_stack(twcs.all_world2pix(c_ra, c_dec, 0)))
        img = (model + art + rng.standard_normal(model.shape) * np.sqrt(var)).astype(np.float32)
        var = var.astype(np.float32)
        exp = Exposure(img, variance=var, wcs=w, psf=GaussianPSF(fwhm=float(fwhm_e[e])),
                       info=ExposureInfo(band="r", visit=e + 1, detector=0, mjd=60000.0 + e, exp_time=30.0))
        exp.writeto(wd / f"ep{e}.fits")
        hdr = w.to_header()
        fits.PrimaryHDU(img, header=hdr).writeto(wd / f"sw{e}.fits", overwrite=True)
        fits.PrimaryHDU(np.full(img.shape, 1.0 / sig_e[e] ** 2, np.float32), header=hdr).writeto(
            wd / f"sw{e}.weight.fits", overwrite=True)
        sw_files.append(str(wd / f"sw{e}.fits"))
        del model, art, img, var, exp
    # static light on the tile (the widest PSF: an upper bound) and where every epoch covers it
    static = np.zeros((tile, tile), np.float32)
    draw_gauss(static, sx, sy, sflux, fwhm_e.max() / FWHM_PER_SIGMA)
    draw_gauss(static, vx, vy, vmean * 1.5, fwhm_e.max() / FWHM_PER_SIGMA)
    np.save(wd / "static.npy", static)
    truth = {"tile": tile, "sig_e": sig_e.tolist(), "fwhm_e": fwhm_e.tolist(), "vx": vx.tolist(), "vy": vy.tolist(),
             "vf": vf.tolist(), "cx": sx[control].tolist(), "cy": sy[control].tolist(),
             "cflux": sflux[control].tolist(), "tx": tx.tolist(), "ty": ty.tolist(),
             "movers": [m.tolist() for m in mover_tile], "streak_tile": [[0.0, 0.25 * tile], [tile - 1.0, 0.7 * tile]],
             "cr_tile": [c.tolist() for c in cr_tile], "sw_files": sw_files}
    (wd / "truth.json").write_text(json.dumps(truth))
    hdr = twcs.to_header()
    for i, (k, v) in enumerate((("NAXIS", 2), ("NAXIS1", tile), ("NAXIS2", tile))):
        hdr.insert(i, (k, v))  # SWarp takes the output grid's size from its .head file
    hdr.totextfile(wd / "tile.hdr", overwrite=True)
    return truth


def tile_wcs(wd: pathlib.Path):
    from astropy.io import fits
    from astropy.wcs import WCS

    hdr = fits.Header.fromtextfile(wd / "tile.hdr")
    w = WCS(hdr)
    w.pixel_shape = (int(hdr["NAXIS1"]), int(hdr["NAXIS2"]))
    return w


# -- the tools (each in its own process) ---------------------------------------------------------------
def run_archive(wd: pathlib.Path, threads: int, n_ep: int) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    from archive.image.exposure import Exposure
    from archive.process.coadd import CoaddConfig, combine, find_artifacts, target_fwhm
    from archive.process.warp import footprint_bbox, psf_match, warp_exposure

    twcs = tile_wcs(wd)
    tile = int(twcs.pixel_shape[0])
    shape = (tile, tile)

    def one(e):
        exp = Exposure.read(wd / f"ep{e}.fits")
        warp = warp_exposure(exp, twcs, shape, footprint_bbox(exp, twcs, shape))
        return warp, warp.psf.fwhm((warp.shape[1] - 1) / 2.0, (warp.shape[0] - 1) / 2.0)

    t = [time.perf_counter()]
    with ThreadPoolExecutor(threads) as pool:
        out = list(pool.map(one, range(n_ep)))
        warps, fw = [o[0] for o in out], [o[1] for o in out]
        t.append(time.perf_counter())
        target = target_fwhm(fw)
        matched = list(pool.map(lambda a: psf_match(a[0], a[1], target), zip(warps, fw)))
    t.append(time.perf_counter())
    clipped = find_artifacts(matched, threads=threads)
    del matched
    t.append(time.perf_counter())
    res = combine(warps, clipped, CoaddConfig(), target_wcs=twcs, threads=threads)
    t.append(time.perf_counter())
    res.coadd.writeto(wd / "archive_coadd.fits")
    t.append(time.perf_counter())
    STAGES.update(zip(("read+warp", "psf_match", "find_artifacts", "combine", "write"), np.diff(t).round(2).tolist()))
    co = res.coadd
    img = np.full(shape, np.nan, np.float32)
    var = np.full(shape, np.nan, np.float32)
    x0, y0 = co.xy0
    nodata = (co.mask & co.get_plane_bitmask("NO_DATA")) != 0
    img[y0:y0 + co.shape[0], x0:x0 + co.shape[1]] = np.where(nodata, np.nan, co.image)
    var[y0:y0 + co.shape[0], x0:x0 + co.shape[1]] = np.where(nodata, np.nan, co.variance)
    np.save(wd / "var_archive.npy", var)
    return img


def run_swarp(wd: pathlib.Path, threads: int, combine_type: str, truth: dict) -> np.ndarray:
    from astropy.io import fits

    run = wd / f"swarp_{combine_type}_{threads}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir()
    shutil.copy(wd / "tile.hdr", run / "coadd.head")
    cmd = [shutil.which("SWarp") or shutil.which("swarp"), *truth["sw_files"], "-c", "/dev/null",
           "-IMAGEOUT_NAME", str(run / "coadd.fits"), "-WEIGHTOUT_NAME", str(run / "coadd.weight.fits"),
           "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits", "-RESAMPLING_TYPE", "LANCZOS3",
           "-COMBINE_TYPE", combine_type, "-SUBTRACT_BACK", "N", "-FSCALASTRO_TYPE", "NONE",
           "-GAIN_DEFAULT", "1.0", "-NTHREADS", str(threads), "-RESAMPLE_DIR", str(run), "-VMEM_DIR", str(run), "-WRITE_XML", "N",
           "-VERBOSE_TYPE", "QUIET", "-DELETE_TMPFILES", "Y"]
    proc = subprocess.Popen(cmd, cwd=run)
    peak = 0.0
    while proc.poll() is None:  # SWarp's own peak RSS, read while it runs
        v = peak_rss_mb(str(proc.pid))
        peak = max(peak, v) if v == v else peak
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"SWarp failed ({proc.returncode})")
    STAGES["swarp_rss_mb"] = peak
    with fits.open(run / "coadd.fits") as h:
        img = h[0].data.astype(np.float32)
    with fits.open(run / "coadd.weight.fits") as h:
        wt = h[0].data
    img[wt <= 0] = np.nan
    return img


def run_reproject(wd: pathlib.Path, threads: int, truth: dict) -> np.ndarray:
    from astropy.io import fits
    from astropy.stats import sigma_clip
    from astropy.wcs import WCS
    from reproject import reproject_interp

    twcs = tile_wcs(wd)
    tile = int(twcs.pixel_shape[0])
    stack = np.empty((len(truth["sw_files"]), tile, tile), np.float32)
    for e, f in enumerate(truth["sw_files"]):
        with fits.open(f) as h:
            data, w = h[0].data, WCS(h[0].header)
            kw = {"parallel": threads, "block_size": (tile // 2, tile // 2)} if threads > 1 else {}
            arr, foot = reproject_interp((data, w), twcs, shape_out=(tile, tile), order="bicubic", **kw)
        arr[foot <= 0] = np.nan
        stack[e] = arr
    np.save(wd / "reproject_stack_mean.npy", _weighted_mean(stack, truth))
    clipped = sigma_clip(stack, sigma=3.0, maxiters=5, cenfunc="median", stdfunc="std", axis=0, masked=True)
    return _weighted_mean(np.ma.filled(clipped.astype(np.float32), np.nan), truth)


def _weighted_mean(stack: np.ndarray, truth: dict) -> np.ndarray:
    w = 1.0 / np.asarray(truth["sig_e"]) ** 2
    ok = np.isfinite(stack)
    wk = w[:, None, None] * ok
    num = np.where(ok, stack, 0.0).astype(np.float32)
    num *= wk.astype(np.float32)
    s = wk.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (num.sum(axis=0) / s).astype(np.float32)


def worker(args) -> None:
    wd = pathlib.Path(args.workdir)
    truth = json.loads((wd / "truth.json").read_text())
    t0 = time.perf_counter()
    if args.worker == "archive":
        img = run_archive(wd, args.threads, args.epochs)
    elif args.worker.startswith("swarp-"):
        img = run_swarp(wd, args.threads, args.worker.split("-")[1].upper(), truth)
    elif args.worker == "reproject":
        img = run_reproject(wd, args.threads, truth)
    elif args.worker == "none":
        import astropy.wcs  # noqa: F401 the baseline of a process with the libraries loaded
        img = None
    else:
        raise SystemExit(f"unknown tool {args.worker}")
    wall = time.perf_counter() - t0
    if img is not None:
        np.save(wd / f"out_{args.worker}_{args.threads}.npy", img)
    print(json.dumps({"wall": wall, "rss_mb": peak_rss_mb(), "children_rss_mb": STAGES.pop("swarp_rss_mb", None),
                      "stages": STAGES}))


# -- measuring the coadds -----------------------------------------------------------------------------
def evaluate(img: np.ndarray, truth: dict, static: np.ndarray, cover: np.ndarray, var: np.ndarray | None = None):
    rng = np.random.default_rng(7)
    sig_e = np.asarray(truth["sig_e"])
    ideal = 1.0 / math.sqrt(float(np.sum(1.0 / sig_e ** 2)))
    tile = truth["tile"]
    yy, xx = np.mgrid[0:tile, 0:tile]
    # artifact footprints
    foot = {k: np.zeros((tile, tile), bool) for k in ("cr", "streak", "transient", "mover")}
    for c in truth["cr_tile"]:
        c = np.round(np.asarray(c)).astype(int)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                x, y = c[:, 0] + dx, c[:, 1] + dy
                ok = (x >= 0) & (x < tile) & (y >= 0) & (y < tile)
                foot["cr"][y[ok], x[ok]] = True
    (x0, y0), (x1, y1) = truth["streak_tile"]
    d = np.abs((x1 - x0) * (y0 - yy) - (x0 - xx) * (y1 - y0)) / math.hypot(x1 - x0, y1 - y0)
    foot["streak"] = d <= 2.0
    for k, pts in (("transient", np.column_stack([truth["tx"], truth["ty"]])),
                   ("mover", np.concatenate([np.asarray(m) for m in truth["movers"]]))):
        for x, y in pts:
            foot[k] |= (xx - x) ** 2 + (yy - y) ** 2 <= 16
    any_art = np.zeros_like(cover)
    for f in foot.values():
        any_art |= f
    # empty pixels: covered by every epoch, no static light, no artifact within 6 px
    from scipy import ndimage

    near_art = ndimage.binary_dilation(any_art, iterations=6)
    empty = cover & (static < 0.02 * ideal) & ~near_art & np.isfinite(img)
    pix_sd = 1.4826 * float(np.median(np.abs(img[empty] - np.median(img[empty]))))
    r = 4
    ap = (np.mgrid[-r:r + 1, -r:r + 1] ** 2).sum(axis=0) <= r * r
    emp_ap = ndimage.binary_erosion(empty, structure=ap)
    cy, cx = np.nonzero(emp_ap)
    sel = rng.choice(cy.size, min(4000, cy.size), replace=False)
    sums, pred = [], []
    for y, x in zip(cy[sel], cx[sel]):
        sl = (slice(y - r, y + r + 1), slice(x - r, x + r + 1))
        sums.append(img[sl][ap].sum())
        if var is not None:
            pred.append(var[sl][ap].sum())
    out = {"pix_ratio": pix_sd / ideal, "ap_ratio": float(np.std(sums)) / (ideal * math.sqrt(ap.sum())),
           "plane_ratio": float(np.std(sums) / math.sqrt(np.mean(pred))) if var is not None else None}
    # artifacts left
    judged = cover & (static < ideal)
    for k, f in foot.items():
        sel = f & judged
        out[f"art_{k}"] = int(np.sum(sel & (img > 5 * pix_sd)))
        out[f"n_{k}"] = int(sel.sum())
    out["art_total"] = sum(out[f"art_{k}"] for k in foot)
    # variable flux
    w = 1.0 / sig_e ** 2
    vf = np.asarray(truth["vf"])
    want = (w[:, None] * vf).sum(axis=0) / w.sum()

    def ap_flux(xs, ys, rr=8):
        apm = (np.mgrid[-rr:rr + 1, -rr:rr + 1] ** 2).sum(axis=0) <= rr * rr
        fl = []
        for x, y in zip(xs, ys):
            x, y = int(round(x)), int(round(y))
            s = img[y - rr:y + rr + 1, x - rr:x + rr + 1]
            fl.append(np.nansum(s[apm]) if cover[y, x] else np.nan)
        return np.array(fl)

    got = ap_flux(truth["vx"], truth["vy"])
    ratio = got / want
    ctrl = ap_flux(truth["cx"], truth["cy"]) / np.asarray(truth["cflux"])
    out["var_ratio_median"] = float(np.nanmedian(ratio))
    out["var_ratio_min"] = float(np.nanmin(ratio))
    out["var_lost_gt2pc"] = int(np.sum(ratio < 0.98))
    out["ctrl_ratio_median"] = float(np.nanmedian(ctrl))
    out["ctrl_ratio_min"] = float(np.nanmin(ctrl))
    out["n_var"] = int(np.isfinite(ratio).sum())
    return out


def coverage(wd: pathlib.Path, truth: dict, size: int) -> np.ndarray:
    """Tile pixels that every epoch covers (10 px inside each epoch's edge)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    twcs = tile_wcs(wd)
    tile = truth["tile"]
    yy, xx = np.mgrid[0:tile, 0:tile]
    ra, dec = twcs.all_pix2world(xx.ravel().astype(float), yy.ravel().astype(float), 0)
    cover = np.ones(tile * tile, bool)
    for f in truth["sw_files"]:
        w = WCS(fits.getheader(f))
        x, y = w.all_world2pix(ra, dec, 0)
        cover &= (x > 10) & (x < size - 11) & (y > 10) & (y < size - 11)
    return cover.reshape(tile, tile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--stars", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--workdir", default=None, help="kept when given (else a temporary directory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = int(args.threads)
        return worker(args)

    from common import git_rev, machine_line

    wd = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_coadd_"))
    wd.mkdir(parents=True, exist_ok=True)
    print(machine_line(), "git", git_rev())
    t0 = time.perf_counter()
    truth = make_field(wd, args.size, args.epochs, args.stars, args.seed)
    print(f"field: {args.epochs} epochs of {args.size}x{args.size} onto a {truth['tile']}^2 tile, "
          f"made in {time.perf_counter() - t0:.1f} s; sky sigma {np.round(truth['sig_e'], 1).tolist()}, "
          f"FWHM {np.round(truth['fwhm_e'], 2).tolist()}", flush=True)
    static = np.load(wd / "static.npy")
    cover = coverage(wd, truth, args.size)
    threads = [int(t) for t in args.threads.split(",")]
    tools = [t for t in args.tools.split(",") if t]
    rows = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = subprocess.run([sys.executable, __file__, "--workdir", str(wd), "--worker", "none", "--threads", "1"],
                          capture_output=True, text=True, check=True, env=env)
    base_rss = json.loads(base.stdout.strip().splitlines()[-1])["rss_mb"]
    for n in threads:
        for tool in tools:
            if tool.startswith("swarp") and not (shutil.which("SWarp") or shutil.which("swarp")):
                print(f"{tool}: SWarp not on PATH (apt-get install -y swarp): skipped")
                continue
            tenv = dict(env, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
            p = subprocess.run([sys.executable, __file__, "--workdir", str(wd), "--worker", tool,
                                "--threads", str(n), "--epochs", str(args.epochs)],
                               capture_output=True, text=True, env=tenv)
            if p.returncode:
                print(f"{tool} x{n} failed:\n{p.stderr[-2000:]}")
                continue
            m = json.loads(p.stdout.strip().splitlines()[-1])
            img = np.load(wd / f"out_{tool}_{n}.npy")
            var = np.load(wd / "var_archive.npy") if tool == "archive" else None
            ev = evaluate(img, truth, static, cover, var)
            rss = m["children_rss_mb"] if tool.startswith("swarp") else m["rss_mb"]
            rows.append((tool, n, m["wall"], rss, ev))
            print(f"{tool} x{n}: {m['wall']:.1f} s, {rss:.0f} MB; stages {m['stages']}; {json.dumps(ev)}", flush=True)
            if tool == "reproject" and n == threads[0]:
                ev0 = evaluate(np.load(wd / "reproject_stack_mean.npy"), truth, static, cover)
                rows.append(("mean (no rejection)", None, None, None, ev0))
    print(f"\nbaseline RSS of a Python process with numpy + astropy loaded: {base_rss:.0f} MB (in the figures)")
    ideal = 1.0 / math.sqrt(float(np.sum(1.0 / np.asarray(truth['sig_e']) ** 2)))
    print(f"ideal coadd pixel noise 1/sqrt(sum 1/sigma_e^2) = {ideal:.3f}")
    ev = rows[0][4] if rows else None
    if ev:
        print(f"artifact footprint pixels judged: CR {ev['n_cr']}, streak {ev['n_streak']}, "
              f"transients {ev['n_transient']}, movers {ev['n_mover']}")
    print("\n| tool | threads | wall s | peak RSS MB | noise pix / ideal | noise r=4 ap / ideal | ap / variance plane "
          "| artifact px left (CR / streak / transient / mover) | variable flux ratio median (min) | variables < 0.98 "
          "| control stars median (min) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|")
    for tool, n, wall, rss, e in rows:
        pr = f"{e['plane_ratio']:.3f}" if e["plane_ratio"] is not None else "-"
        print(f"| {tool} | {n if n else '-'} | {f'{wall:.1f}' if wall else '-'} | {f'{rss:.0f}' if rss else '-'} "
              f"| {e['pix_ratio']:.3f} | {e['ap_ratio']:.3f} | {pr} | {e['art_total']} ({e['art_cr']} / "
              f"{e['art_streak']} / {e['art_transient']} / {e['art_mover']}) | {e['var_ratio_median']:.4f} "
              f"({e['var_ratio_min']:.4f}) | {e['var_lost_gt2pc']} / {e['n_var']} | {e['ctrl_ratio_median']:.4f} "
              f"({e['ctrl_ratio_min']:.4f}) |")
    if not args.workdir:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
