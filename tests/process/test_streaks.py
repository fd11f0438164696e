"""Streak finding and masking against the simulator's streak truth."""

import numpy as np
import pandas as pd
import pytest

from archive.image.raw import read_raw
from archive.process import isr
from archive.process.background import estimate_background
from archive.process.masters import make_master_bias, make_master_dark, make_master_flat
from archive.process.streaks import find_streaks
from archive.sim import SimConfig, load_manifest, simulate_survey


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    """Two ISR-processed epochs of a field with bright (saturated, bleeding) stars and bad
    columns; the second is crossed by a satellite."""
    d = tmp_path_factory.mktemp("streak")
    simulate_survey(d, SimConfig(seed=9, n_epochs=2, size=640, star_density=100, streak_epochs=(1,), n_bias=3, n_dark=3, n_flat=3))
    man = load_manifest(d)
    bias = make_master_bias([read_raw(d / c["path"]) for c in man["calib"]["bias"]])
    dark = make_master_dark([read_raw(d / c["path"]) for c in man["calib"]["dark"]], bias)
    flat = make_master_flat([read_raw(d / c["path"]) for c in man["calib"]["flat"]["r"]], bias, dark)
    out = []
    for r in man["raws"]:
        exp = isr.run(read_raw(d / r["path"]), bias, dark, flat)
        bad = exp.mask_of("BAD", "SAT", "NO_DATA") | ~np.isfinite(exp.image)
        bkg = estimate_background(exp.image, mask=bad)
        out.append((exp, exp.image - bkg.background))
    return (out, pd.read_parquet(d / "truth" / "streaks.parquet"), pd.read_parquet(d / "truth" / "defects.parquet"),
            pd.read_parquet(d / "truth" / "sources.parquet"))


def test_streak_is_found_and_masked_tightly(epochs):
    (exps, truth, _, _) = epochs
    exp, img = exps[1]
    mask, tab = find_streaks(img, exp.variance, exp.mask, exp.mask_planes)
    t = truth[truth.visit == exp.info.visit].iloc[0]
    assert len(tab) == 1
    s = tab.iloc[0]
    # the line: direction within 0.2 deg, and it passes within a pixel of the true one
    ang_true = np.degrees(np.arctan2(t.y1 - t.y0, t.x1 - t.x0)) % 180
    assert abs((s.angle_deg % 180) - ang_true) < 0.2 or abs(abs((s.angle_deg % 180) - ang_true) - 180) < 0.2
    ny, nx = img.shape
    gy, gx = np.mgrid[0:ny, 0:nx]
    a = np.radians(ang_true)
    dist = np.abs((gx - t.x0) * np.sin(a) - (gy - t.y0) * np.cos(a))
    assert mask[dist < 2.5 * t.sigma_px].mean() > 0.999  # the trail and its wings are masked ...
    assert not (mask & (dist > 6 * t.sigma_px + 2)).any()  # ... and not much more
    assert s.width == pytest.approx(t.sigma_px, rel=0.3)


def test_no_streak_on_a_clean_epoch(epochs):
    (exps, _, defects, _) = epochs
    exp, img = exps[0]
    assert exp.mask_of("SAT").any() and exp.mask_of("BAD").any()  # bleeds and bad columns are there
    mask, tab = find_streaks(img, exp.variance, exp.mask, exp.mask_planes)
    assert len(tab) == 0 and not mask.any()


def test_streak_epoch_processes_with_the_trail_masked_and_flagged(epochs):
    from archive.process import single_frame

    (exps, truth, _, _) = epochs
    exp, _ = exps[1]
    res = single_frame.process_exposure(exp)
    assert not res.rejected, res.reason
    assert len(res.streaks) == 1 and res.calexp.mask_of("STREAK").any()
    t = truth[truth.visit == exp.info.visit].iloc[0]
    a = np.arctan2(t.y1 - t.y0, t.x1 - t.x0)
    s = res.sources
    d = np.abs((s.x - t.x0) * np.sin(a) - (s.y - t.y0) * np.cos(a))
    near = (d < res.streaks.half_width.iloc[0]).to_numpy()
    # sources under the mask are real stars there, flagged STREAK; none is made out of the trail
    streak_bit = 1 << res.calexp.mask_planes["STREAK"]
    assert ((s["flags"].to_numpy()[near] & streak_bit) != 0).all()
    objs = epochs[3]
    objs = objs[(objs.visit == exp.info.visit) & (objs.flux_njy > 1000)]
    dt = np.abs((objs.x - t.x0) * np.sin(a) - (objs.y - t.y0) * np.cos(a))
    assert near.sum() <= (dt < res.streaks.half_width.iloc[0] + 2).sum()
