import math

import numpy as np
import pytest
from astropy.io import fits

from archive.errors import ValidationError
from archive.image import mask as maskmod
from archive.image.calib import PhotoCalib, mag_to_njy, njy_to_mag


def test_default_bits_and_bits_helper():
    planes = maskmod.default_mask_planes()
    assert planes["BAD"] == 0 and planes["SAT"] == 1 and planes["DETECTED_NEGATIVE"] == 10
    assert maskmod.bits(planes, "SAT", "CR") == (1 << 1) | (1 << 2)
    assert maskmod.bits(planes) == 0
    with pytest.raises(ValidationError, match="NOPE"):
        maskmod.bits(planes, "NOPE")


def test_add_plane_and_header_round_trip():
    planes = maskmod.default_mask_planes()
    bit = maskmod.add_plane(planes, "ghost")
    assert bit == 11 and planes["GHOST"] == 11
    assert maskmod.add_plane(planes, "GHOST") == 11  # idempotent
    bit2 = maskmod.add_plane(planes, "VERY_LONG_PLANE_NAME")  # needs HIERARCH
    h = maskmod.planes_to_header(planes, fits.Header())
    assert h["MP_SAT"] == 1
    back = maskmod.planes_from_header(fits.Header.fromstring(h.tostring()))
    assert back == planes and back["VERY_LONG_PLANE_NAME"] == bit2


def test_validate_rejects_duplicate_bits():
    with pytest.raises(ValidationError, match="share bit"):
        maskmod.validate_planes({"A": 3, "B": 3})
    with pytest.raises(ValidationError, match="bit"):
        maskmod.validate_planes({"A": 31})


def test_photocalib_zero_point_and_conversion():
    # 1 nJy per count -> a count is AB 31.4
    assert PhotoCalib(1.0).zero_point == pytest.approx(31.4)
    cal = PhotoCalib.from_zero_point(27.0, 0.01)
    assert cal.zero_point == pytest.approx(27.0, abs=1e-12)
    assert cal.njy_per_count == pytest.approx(10 ** (0.4 * 4.4))
    assert cal.zero_point_err == pytest.approx(0.01, rel=1e-9)
    assert cal.to_njy(100.0) == pytest.approx(100 * cal.njy_per_count)
    np.testing.assert_allclose(cal.to_njy(np.array([1.0, 2.0])), [cal.njy_per_count, 2 * cal.njy_per_count])
    assert cal.to_mag(1.0) == pytest.approx(27.0)
    assert math.isnan(cal.to_mag(-1.0))
    e = cal.to_njy_err(100.0, 10.0, include_calib=True)
    assert e == pytest.approx(math.hypot(10 * cal.njy_per_count, 100 * cal.njy_per_count_err))
    assert njy_to_mag(mag_to_njy(22.3)) == pytest.approx(22.3)
    with pytest.raises(ValidationError):
        PhotoCalib(0.0)
