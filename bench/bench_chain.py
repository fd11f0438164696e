"""Cost of the whole chain per exposure, and what a survey night would need.

Runs ``archive demo`` (simulation, then every step of ``archive run`` on one worker
process, so that a step's seconds are its CPU cost) on fields of the given sizes, each in a
fresh process (peak memory = that process's maxrss), and prints per step the seconds
per unit (an exposure, a warp, a tile). Then it scales the per-exposure cost by pixel
count to a ZTF night (~700 exposures x 16 CCDs of 6k x 6k) and an LSST night (~1,000
visits x 189 CCDs of 4k x 4k) and says how many cores each needs to keep up within a
10-hour night: with every step (the template building included) and per visit alone (the
steps of PER_VISIT; warp, coadd, template, template_catalog and dia_template are built once
per tile).

    python bench/bench_chain.py --sizes 2048 4096 --epochs 6
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

NIGHT_S = 10 * 3600.0
# steps run for every visit (the rest build a tile's template once: warp, coadd, template, ...)
PER_VISIT = ("calexp", "epoch_quality", "astrometry", "sources", "difference", "forced", "template_forced")
SURVEYS = {"ZTF": (700 * 16, 6144 * 6144), "LSST": (1000 * 189, 4096 * 4096)}


def one(size: int, epochs: int, seed: int) -> dict:
    """Run the demo chain on one field in this process; per-step seconds and units."""
    import resource

    from archive.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        rep = run_demo(os.path.join(tmp, "demo"), epochs=epochs, size=size, seed=seed, jobs=1, progress=False)
        steps = rep.steps.to_dict("records")
        n_exp = int((rep.exposures["status"] == "processed").sum())
        s = rep.score
    return {"size": size, "epochs": epochs, "processed": n_exp, "steps": steps,
            "seconds": rep.seconds, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "completeness": s.completeness, "n_expected": s.n_expected, "false_per_4k": s.false_per_4k}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(one(args.child, args.epochs, args.seed)))
        return 0
    print(f"cores: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.1f}")
    per_px = visit_px = None
    for size in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--child", str(size), "--epochs", str(args.epochs),
                               "--seed", str(args.seed)], capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
            return 1
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\n{size} x {size}, {r['epochs']} visits ({r['processed']} processed), one worker: "
              f"run {r['seconds']['run']} s, simulation {r['seconds']['simulation']} s, peak RSS "
              f"{r['maxrss_mb']:.0f} MB; completeness {r['completeness']:.2f} of {r['n_expected']} changes "
              f"at S/N >= 7, false DIAObjects {r['false_per_4k']:.0f} per 4k^2")
        print(f"  {'step':14s} {'units':>6s} {'seconds':>8s} {'s/unit':>7s}")
        total = visit = 0.0
        for st in r["steps"]:
            per = st["seconds"] / st["done"] if st["done"] else 0.0
            print(f"  {st['step']:14s} {st['done']:6d} {st['seconds']:8.1f} {per:7.2f}")
            total += st["seconds"]
            if st["step"] == "astrometry":  # one unit per field: its share per raw exposure
                n_raw = next((x["done"] for x in r["steps"] if x["step"] == "calexp"), 1)
                visit += st["seconds"] / max(n_raw, 1)
            elif st["step"] in PER_VISIT:
                visit += per
        per_exposure = total / max(r["processed"], 1)
        print(f"  all steps per processed exposure: {per_exposure:.1f} CPU-s "
              f"({per_exposure / (size * size) * 1e6:.2f} CPU-s per Mpx)")
        print(f"  per visit, template building left out (s/unit of {', '.join(PER_VISIT)}): {visit:.1f} CPU-s "
              f"({visit / (size * size) * 1e6:.2f} CPU-s per Mpx)")
        per_px, visit_px = per_exposure / (size * size), visit / (size * size)
    if per_px:
        print("\nscaled by pixel count from the largest size (one core per worker):")
        for name, (n, px) in SURVEYS.items():
            cpu, cpu_v = n * px * per_px, n * px * visit_px
            print(f"  {name}: {n} CCD-exposures of {px / 1e6:.1f} Mpx -> {cpu / 3600:.0f} core-hours, "
                  f"{cpu / NIGHT_S:.0f} cores to keep up within a 10-hour night; per visit alone "
                  f"{cpu_v / 3600:.0f} core-hours, {cpu_v / NIGHT_S:.0f} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
