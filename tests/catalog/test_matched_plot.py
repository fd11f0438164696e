"""The rms-versus-magnitude figure draws the fitted noise curve and rings the outliers the table
reports; `matched zeropoints` explains an rms that rises."""

from __future__ import annotations

import numpy as np
import pandas as pd

from archive.catalog.matched import plot_rms_vs_mag, rms_figure
from archive.catalog.matched_ingest import rms_with_model
from archive.cli.matched import rms_rise_note


def _table(seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    mag = rng.uniform(15, 21, 200)
    rms = 0.003 * 10 ** (0.3 * (mag - 15)) * rng.lognormal(0, 0.1, 200)
    rms[[5, 17]] = 0.5  # two variables
    return rms_with_model(pd.DataFrame({"matched_source_id": np.arange(200), "band": "r", "mean_mag": mag,
                                        "rms_mag": rms, "n": 10}))


def test_figure_draws_the_model_and_rings_the_outliers(tmp_path):
    import matplotlib.pyplot as plt

    table = _table()
    assert table["outlier"].sum() == 2 and bool(table["outlier"].iloc[5])
    fig = rms_figure(table)
    ax = fig.axes[0]
    model = [ln for ln in ax.get_lines() if ln.get_gid() == "rms_model"]
    assert len(model) == 1
    x, y = model[0].get_data()
    order = np.argsort(table["mean_mag"].to_numpy())
    np.testing.assert_allclose(x, table["mean_mag"].to_numpy()[order])
    np.testing.assert_allclose(y, table["rms_model"].to_numpy()[order])
    rings = [c for c in ax.collections if c.get_gid() == "outliers"]
    assert len(rings) == 1
    np.testing.assert_allclose(np.sort(rings[0].get_offsets()[:, 1]), [0.5, 0.5])
    assert "outliers (2)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    path = plot_rms_vs_mag(table, tmp_path / "rms.png")
    assert path.stat().st_size > 5000


def test_figure_without_model_columns():
    import matplotlib.pyplot as plt

    t = _table().drop(columns=["rms_model", "excess", "outlier"])
    fig = rms_figure(t)
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "rms_model"]
    plt.close(fig)


def test_rms_rise_is_explained():
    assert rms_rise_note(0.02, 0.015, 30) == ""
    text = rms_rise_note(0.010, 0.012, 4)
    assert "rose (0.0100 -> 0.0120 mag)" in text and "4 reference star(s)" in text and "0.0060 mag" in text
    assert "--raw" in text
