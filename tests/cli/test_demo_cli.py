"""`archive demo`, the README's main job, end to end on a small simulated survey."""

from __future__ import annotations

from archive.api import Archive
from archive.cli.main import main


def test_demo_runs_the_chain_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--epochs", "4"]) == 0  # the README command, 1024-px frames
    text = capsys.readouterr()
    # four visits listed; the simulator's cloudy epoch is rejected against the others, with its reason
    assert "processed 3 exposure(s), rejected 1" in text.err
    assert "rejected: quality: zero point" in text.out and "clouds" in text.out
    assert "matched into" in text.out and "try: archive cone" in text.out
    with Archive.open(out / "archive") as arc:
        exp = arc.sql("SELECT status, count(*) AS n FROM exposure GROUP BY status ORDER BY status")
        assert exp.set_index("status")["n"].to_dict() == {"processed": 3, "rejected": 1}
        assert arc.count("source") > 100 and arc.count("matched_source") > 50
        assert arc.count("image_product") == 6  # calexp + src of each processed exposure
    # a second demo into the same directory is refused in one line
    assert main(["demo", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
