"""Corrupt and odd images are skipped and recorded or embedded, never a crash, and their ids
come back out of predictions.csv; ``carrot embed`` killed with SIGKILL at seeded moments resumes
to a store identical to an uninterrupted run's, and no incomplete store verifies."""

from __future__ import annotations

import dataclasses

from flows.faults.corrupt_images import UNREADABLE, run_corrupt_images
from flows.faults.kills import run_kill_trials


def test_corrupt_images_are_skipped_recorded_and_ids_round_trip(tmp_path, prefect_harness):
    result = run_corrupt_images(tmp_path)
    assert result["crashes"] == 0, result
    assert result["skipped_ids"] == sorted(UNREADABLE)
    assert result["ids_lost"] == 0 and result["strict_not_refused"] == 0


def test_kill_9_of_embed_resumes_to_the_uninterrupted_store(tmp_path, prefect_harness):
    report = run_kill_trials(tmp_path, trials=1, seed=0)  # seed 0: killed after 15 chunks
    assert report.trials == 1 and report.killed_mid_write == 1, dataclasses.asdict(report)
    assert report.verified_incomplete == report.complete_early == 0
    assert report.failed_reruns == report.not_identical == report.lost_rows == 0
