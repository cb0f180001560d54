"""Run-record provenance: the commit a long job reports is the one it started with."""
from __future__ import annotations

import pytest

from lpqld_fast import records


def test_pinned_commit_survives_a_moving_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_pinned_commit", [])
    monkeypatch.setattr(records, "git_commit", lambda path=None: "aaaa")
    assert records.pin_commit() == "aaaa"
    # HEAD moves while the job runs (a commit lands): the record still names the code that was imported.
    monkeypatch.setattr(records, "git_commit", lambda path=None: "bbbb")
    assert records.pin_commit() == "aaaa"
    assert records.run_record({}, 0, "cpu")["commit"] == "aaaa"


def test_unpinned_record_reads_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(records, "_pinned_commit", [])
    monkeypatch.setattr(records, "git_commit", lambda path=None: "cccc")
    assert records.run_record({}, 0, "cpu")["commit"] == "cccc"
