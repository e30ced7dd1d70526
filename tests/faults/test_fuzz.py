"""Fuzzing with hypothesis, seeded (`flows.faults.fuzz`): drawn CSV manifests through
``carrot embed`` exit 0 or 2, never with a traceback, on one stderr line when refused, never
leaving a partial store marked complete, and an accepted one's store holds exactly its rows;
drawn invalid option values of ``carrot embed``, ``train`` and ``predict`` are refused (exit 2,
one line, no traceback) before any Prefect flow starts."""

from __future__ import annotations

from pathlib import Path

from flows.faults import fuzz
from flows.faults.bad_inputs import no_flows
from flows.faults.console import carrot


def test_fuzzed_csv_manifests_are_embedded_right_or_refused_on_one_line(tmp_path, prefect_harness):
    result = fuzz.fuzz_csv_manifests(tmp_path, examples=24, seed=0)
    failures = fuzz.failure_counts(result)
    assert set(failures) == set(fuzz.FAILURES) - {"reached_flow"}
    assert not any(failures.values()), result["failures"]
    assert result["examples"] == 24 == result["accepted"] + result["refused"]
    assert result["accepted"] >= 5 and result["refused"] >= 5, result  # both kinds exercised
    assert result["predicted"] >= 20  # most verdicts checked against the rules
    assert len(result["mutations"]) >= 8 and len(result["reasons"]) >= 3, result


def test_fuzzed_invalid_options_are_refused_before_any_flow(tmp_path, prefect_harness):
    result = fuzz.fuzz_cli_options(tmp_path, examples=150, seed=0)
    failures = fuzz.failure_counts(result)
    assert set(failures) == set(fuzz.FAILURES) - {"wrong_store", "complete_when_failed"} - {
        "accepted_bad"
    }
    assert not any(failures.values()), result["failures"]
    assert result["refused_right"] == result["examples"] == 150
    assert result["by_command"] == {"embed": 50, "predict": 50, "train": 50}
    assert result["unfuzzed"] == []  # every option has values known to be invalid
    assert len(result["by_kind"]) >= 8, result["by_kind"]  # ints, floats, choices, paths…


def _findings(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """What larger fuzz runs found (each exited 1, reached a flow or named no option), fixed."""
    (tmp / "a-file").write_text("not a folder")
    nul = tmp / "nul.csv"
    nul.write_bytes(b"path,label\na/0.png,a\n../x\x00y/z.png,b\n")
    digits = ["sklearn:digits", "--backbone", "test_resnet"]
    return {
        "superscript cache point": ([*digits, "--cache-at", "block:-²"], "--cache-at"),
        "superscript last:N": (
            ["sklearn:digits", "--backbone", "test_vit", "--features", "last:²"],
            "--features",
        ),
        "NUL in a manifest path": ([str(nul), "--backbone", "test_resnet"], "NUL"),
        "--root is a file": ([*digits, "--root", str(tmp / "a-file")], "is a file"),
        "--root below a file": ([*digits, "--root", str(tmp / "a-file" / "sub")], "is a file"),
        "Arabic-Indic digit": ([*digits, "--batch-size", "٣"], "--batch-size"),
        "port out of range": ([*digits, "--dask-address", "tcp://127.0.0.1:99999"], "--dask"),
        "empty --backbone": (["sklearn:digits", "--backbone", ""], "--backbone"),
        "fractions named": ([*digits, "--val-fraction", "0.6", "--test-fraction", "0.5"], "--val"),
    }


def test_the_fuzzers_findings_stay_fixed(tmp_path):
    for name, (argv, needle) in _findings(tmp_path).items():
        with no_flows():
            code, _, err = carrot(["embed", *argv], CARROT_HOME=str(tmp_path / "home"))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (name, code, err)
        assert "Traceback" not in err, name
    assert not (tmp_path / "home").exists()  # nothing written, no store
