"""An embedded archive written before the schema gained a table still opens: the new table
reads as empty and takes rows; a manifest whose entry for a table is damaged is still refused."""

from __future__ import annotations

import json

import pytest

from archive.api import Archive
from archive.errors import ArchiveError


def test_archive_older_than_a_new_table_opens_and_grows(tmp_path):
    repo = tmp_path / "arc"
    Archive.init(repo).close()
    path = repo / "manifest.json"
    m = json.loads(path.read_text())
    del m["tables"]["dia_forced_source"]  # as an archive written before that table existed
    path.write_text(json.dumps(m))
    with Archive.open(repo) as arc:
        assert arc.count("dia_forced_source") == 0
        assert arc.sql("SELECT count(*) AS n FROM dia_forced_source")["n"].iloc[0] == 0
        assert arc.count("exposure") == 0


def test_damaged_table_entry_is_still_refused(tmp_path):
    repo = tmp_path / "arc"
    Archive.init(repo).close()
    path = repo / "manifest.json"
    m = json.loads(path.read_text())
    m["tables"]["exposure"] = {"files": "not a mapping"}
    path.write_text(json.dumps(m))
    with pytest.raises(ArchiveError, match="corrupt.*exposure"):
        Archive.open(repo).count("exposure")
