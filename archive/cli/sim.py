"""`archive sim OUTDIR`: write a simulated survey (raws, calibration frames, truth, reference catalog)."""

from __future__ import annotations

import argparse

from archive.errors import ArchiveError


def _bands(text: str) -> tuple[str, ...]:
    bands = tuple(b.strip() for b in text.split(",") if b.strip())
    if not bands:
        raise argparse.ArgumentTypeError("expected a comma-separated list such as r or g,r,i")
    return bands


def register(sub) -> None:
    p = sub.add_parser("sim", help="simulate a small survey with truth tables (defaults: SimConfig's)",
                       description="Simulate raw frames, calibration frames, truth tables (Parquet), a reference "
                                   "catalog and a manifest into OUTDIR; deterministic from --seed.")
    p.add_argument("outdir", metavar="OUTDIR", help="output directory (absent or empty unless --overwrite)")
    p.add_argument("--config", metavar="JSON", help="SimConfig fields as JSON (e.g. a manifest's 'config'); "
                                                     "options given on the command line override it")
    p.add_argument("--epochs", type=int, help="number of visits (default 10)")
    p.add_argument("--size", type=int, help="imaging pixels per detector side (default 1024)")
    p.add_argument("--seed", type=int, help="random seed (default 1)")
    p.add_argument("--detectors", type=int, help="detectors per visit (default 1)")
    p.add_argument("--bands", type=_bands, help="bands observed in turn, e.g. g,r,i (default r)")
    p.add_argument("--pixel-scale", type=float, help="arcsec per pixel (default 0.2)")
    p.add_argument("--ra", type=float, help="field centre RA, deg (default 150)")
    p.add_argument("--dec", type=float, help="field centre Dec, deg (default 2)")
    p.add_argument("--cadence", type=float, help="days between visits (default 1)")
    p.add_argument("--seeing", type=float, help="median seeing FWHM, arcsec (default 0.85)")
    p.add_argument("--transients", type=int, help="transients per detector area (default 4)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUTDIR")
    p.set_defaults(func=cmd_sim)


#: command-line option -> SimConfig field
_FIELDS = {"epochs": "n_epochs", "size": "size", "seed": "seed", "detectors": "n_detectors", "bands": "bands",
           "pixel_scale": "pixel_scale", "ra": "ra0", "dec": "dec0", "cadence": "cadence_days",
           "seeing": "seeing_arcsec", "transients": "n_transients"}


def _config(args):
    import json
    import pathlib

    from archive.sim import SimConfig

    fields: dict = {}
    if args.config:
        path = pathlib.Path(args.config)
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ArchiveError(f"{path}: not valid JSON ({exc})") from exc
        if isinstance(fields, dict) and "config" in fields and "format" in fields:  # a manifest
            fields = fields["config"]
        if not isinstance(fields, dict):
            raise ArchiveError(f"{path}: expected a JSON object of SimConfig fields")
    for opt, name in _FIELDS.items():
        value = getattr(args, opt)
        if value is not None:
            fields[name] = value
    return SimConfig.from_dict(fields)


def simulate_with_progress(outdir, config, overwrite: bool = False) -> dict:
    """:func:`archive.sim.simulate_survey` with named stages (calibration frames, raw frames,
    truth tables) and a bar on a terminal."""
    from archive.cli.progress import Stages
    from archive.sim import simulate_survey

    n_cal = config.n_detectors * (config.n_bias + config.n_dark + config.n_flat * len(config.bands))
    names = ["calibration frames", "raw frames", "truth tables"]
    with Stages(names) as st:
        cal = st.callback("calibration frames", total=n_cal) if n_cal else None
        raw = st.callback("raw frames", total=None)
        state: dict = {}

        def progress(done: int, total: int, what: str) -> None:
            if done <= n_cal and cal is not None:
                cal(done, n_cal, what)
            else:
                raw(done - n_cal, total - n_cal, what)
                if done == total:
                    state["truth"] = st.stage("truth tables").__enter__()

        try:
            manifest = simulate_survey(outdir, config, overwrite=overwrite, progress=progress)
        except OSError as exc:
            raise ArchiveError(f"cannot write {outdir}: {exc}") from exc
        finally:
            if "truth" in state:
                state.pop("truth").__exit__(None, None, None)
    return manifest


def cmd_sim(args) -> int:
    manifest = simulate_with_progress(args.outdir, _config(args), overwrite=args.overwrite)
    c = manifest["counts"]
    kinds = ", ".join(f"{v} {k}" for k, v in sorted(c["objects"].items()))
    print(f"wrote {c['raws']} raw frame(s), {c['calib_frames']} calibration frame(s), {c['refcat']} reference "
          f"star(s) and truth for {kinds} to {args.outdir} in {manifest['elapsed_s']:.1f} s")
    return 0
