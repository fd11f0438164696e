"""Clouds and bad focus, judged against the other exposures of a band."""

import numpy as np
import pandas as pd
import pytest

from archive.errors import ValidationError
from archive.process.epoch_quality import EpochQualityConfig, check_epochs


def test_cloudy_and_defocused_epochs_are_flagged_with_reasons():
    t = pd.DataFrame({"band": ["r"] * 6 + ["g"] * 2,
                      "zero_point": [28.0, 28.1, 27.9, 26.8, 28.05, 27.5, 28.4, 26.0],
                      "seeing": [0.8, 0.85, 0.9, 0.82, 1.5, 0.8, 0.9, 3.0]}, index=np.arange(10, 18))
    v = check_epochs(t)
    assert list(v.index) == list(t.index)
    assert v.loc[13, "flags"] == ["LOW_TRANSPARENCY"] and "1.15 mag below the median of the 6 r-band" in v.loc[13, "reason"]
    assert v.loc[14, "flags"] == ["POOR_SEEING"] and "1.80 times the median" in v.loc[14, "reason"]
    assert v.loc[15, "reason"] == ""  # 0.45 mag: thin cloud, still usable
    assert (v.loc[[10, 11, 12, 15], "reason"] == "").all()
    assert (v.loc[[16, 17], "reason"] == "").all()  # two g exposures: no median to judge by
    assert v.loc[13, "reason"].startswith("quality: ")
    v2 = check_epochs(t, EpochQualityConfig(max_zp_deficit_mag=0.4, min_epochs=2))
    assert v2.loc[15, "flags"] == ["LOW_TRANSPARENCY"] and v2.loc[17, "flags"] == ["LOW_TRANSPARENCY", "POOR_SEEING"]


def test_unknown_values_and_missing_columns():
    t = pd.DataFrame({"band": ["r"] * 3, "zero_point": [np.nan, 28.0, 28.0], "seeing": [np.nan, np.nan, np.nan]})
    assert (check_epochs(t)["reason"] == "").all()
    with pytest.raises(ValidationError, match="lacks column 'seeing'"):
        check_epochs(t.drop(columns="seeing"))
