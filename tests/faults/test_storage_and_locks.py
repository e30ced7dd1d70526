"""A full disk and a read-only place: one line, exit 2, nothing corrupted, resumable; a lock of
another host is respected while its heartbeat is fresh and taken over once it expired. (The
live-writer, --wait, killed-writer and two-stores scenarios run in `carrot bench faults`.)"""

from __future__ import annotations

import dataclasses

from flows.faults.concurrency import Scenarios
from flows.faults.kills import EMBED_ARGS, store_of
from flows.faults.storage import mounts_available, run_storage_faults


def test_full_disk_and_read_only_places_are_refused_cleanly(tmp_path, prefect_harness):
    report = run_storage_faults(tmp_path)
    assert report.trials == (4 if mounts_available() else 2), dataclasses.asdict(report)
    assert report.refused_right == report.trials, report.details
    assert report.tracebacks == report.corrupted == report.failed_resumes == 0, report.details


def test_a_lock_of_another_host_is_respected_until_its_heartbeat_expires(tmp_path, prefect_harness):
    s = Scenarios(tmp_path)
    want = s.reference(EMBED_ARGS, "reference")
    s.other_host(want, store_of(tmp_path / "reference").name, EMBED_ARGS)
    r = s.report
    assert r.scenarios == 2 and r.refusals_wrong == r.recoveries_wrong == 0, r.details
    assert r.not_identical == r.tracebacks == 0, r.details
