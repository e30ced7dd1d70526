"""Every bad input of the catalogue (`flows.faults.bad_inputs`, ≥ 40): exit code 2, one line on
stderr naming the input or the fix, no traceback, no Prefect flow started (except damage only
the data's bytes show); `carrot store verify` fails on every damaged store."""

from __future__ import annotations

import pytest

from flows.faults import bad_inputs

CASES = {case.name: case for case in bad_inputs.cases()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return bad_inputs.prepare(tmp_path_factory.mktemp("bad-inputs"))


def test_the_catalogue_covers_at_least_40_inputs():
    assert len(CASES) >= 40 and len(CASES) == len(bad_inputs.cases())  # names are unique


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if not c.in_flow))
def test_bad_input_is_refused_on_one_line_before_any_flow(root, name):
    outcome = bad_inputs.run_case(CASES[name], root)
    assert outcome.ok, outcome
    assert not (root / "PWNED").exists()  # the pickled code never ran


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.in_flow))
def test_damage_found_by_reading_is_refused_on_one_line(root, name, prefect_harness):
    outcome = bad_inputs.run_case(CASES[name], root)
    assert outcome.ok, outcome


def test_the_guard_catches_a_command_that_reaches_a_flow(root):
    """A good command is not a bad input: under the guard it reaches the flow and fails."""
    good = bad_inputs.BadInput("good", lambda r: ["train", str(r / "stores/good.zarr")], "x")
    outcome = bad_inputs.run_case(good, root)
    assert not outcome.ok and outcome.code == 1 and "ReachedFlow" in outcome.lines[0]


@pytest.mark.parametrize("name", bad_inputs.DAMAGED)
def test_verify_fails_on_every_damaged_store(root, name, capsys):
    from flows.cli import main

    assert main(["store", "verify", str(root / "stores" / f"{name}.zarr")]) == 1
    assert "problem" in capsys.readouterr().out
