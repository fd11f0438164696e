"""Benchmark of the survey simulator: a 2k x 2k, 10-epoch set (the issue's target: well under a minute).

Usage: python bench/bench_sim.py [--size 2048] [--epochs 10] [--detectors 1] [--out DIR]

Prints the wall time of the whole run and of the stages of one epoch
(render the noiseless model, expose + read out, write the raw FITS), plus
the CPU load at the start (the figures scale with a shared machine's load).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import tempfile
import time

from archive.image.raw import write_raw
from archive.sim import SimConfig, simulate_survey
from archive.sim.camera import expose_object, make_detector
from archive.sim.render import plan_epochs, render_epoch
from archive.sim.skymodel import make_sky


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--detectors", type=int, default=1)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one, removed)")
    args = ap.parse_args()
    cfg = SimConfig(size=args.size, n_epochs=args.epochs, n_detectors=args.detectors)
    print(f"load average at start: {os.getloadavg()}  cpus: {os.cpu_count()}")
    out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp(prefix="bench_sim_"))
    try:
        t0 = time.perf_counter()
        manifest = simulate_survey(out / "survey", cfg, overwrite=True)
        total = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in (out / "survey").rglob("*") if p.is_file()) / 1e6
        print(f"simulate_survey {args.size}x{args.size} x {args.epochs} epochs x {args.detectors} detector(s): "
              f"{total:.1f} s, {manifest['counts']['raws']} raws + {manifest['counts']['calib_frames']} calibration "
              f"frames, {size_mb:.0f} MB")
        sky = make_sky(cfg)
        ep = plan_epochs(cfg)[0]
        det = make_detector(cfg, 0)
        t = time.perf_counter()
        model = render_epoch(cfg, sky, ep, 0)
        t_render = time.perf_counter() - t
        t = time.perf_counter()
        frame = expose_object(cfg, det, model)
        t_expose = time.perf_counter() - t
        t = time.perf_counter()
        write_raw(out / "one.fits", frame)
        t_write = time.perf_counter() - t
        print(f"one epoch: render {t_render:.2f} s ({len(model.sources)} objects on the detector), "
              f"expose+readout {t_expose:.2f} s, write {t_write:.2f} s")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
