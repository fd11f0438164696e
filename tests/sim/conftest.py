import pytest

from archive.sim.camera import make_detector
from archive.sim.config import SimConfig
from archive.sim.render import plan_epochs
from archive.sim.skymodel import make_sky


@pytest.fixture(scope="package")
def small():
    """A 384 x 384, 8-epoch configuration with its sky, epochs and detector (no rendering yet)."""
    cfg = SimConfig(size=384, n_epochs=8, seed=3, bad_epochs={2: "clouds", 5: "focus"}, streak_epochs=(3,))
    return {"config": cfg, "sky": make_sky(cfg), "epochs": plan_epochs(cfg), "detector": make_detector(cfg, 0)}
