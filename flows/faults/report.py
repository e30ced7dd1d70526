"""``carrot bench faults``: run the fault scenarios, print the counts, write JSON.

Scenarios: the bad-input catalogue (`bad_inputs`), `carrot store verify` on each damaged store,
corrupt and odd image files (`corrupt_images`), ``carrot embed`` killed with SIGKILL at seeded
moments (`kills`), ``carrot train`` / ``carrot finetune`` / ``carrot sweep`` killed likewise
(`run_kills`), a full disk and read-only places (`storage`), writers that meet on a store
(`concurrency`), and hypothesis-drawn CSV manifests and option strings (`fuzz`). Every count
named ``…lost``, ``…half_written``, ``…tracebacks`` or ``…wrong`` has target 0.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from flows.faults import (
    bad_inputs,
    concurrency,
    corrupt_images,
    fuzz,
    kills,
    run_kills,
    storage,
)
from flows.faults.console import carrot


def run_bad_inputs(root: Path) -> dict[str, Any]:
    """Every catalogue case, and `carrot store verify` on every damaged store."""
    bad_inputs.prepare(root)
    outcomes = [bad_inputs.run_case(case, root) for case in bad_inputs.cases()]
    verify = {}
    for name in bad_inputs.DAMAGED:
        verify[name], _, _ = carrot(["store", "verify", str(root / "stores" / f"{name}.zarr")])
    return {
        "tried": len(outcomes),
        "refused_right": sum(o.ok for o in outcomes),
        "exit_not_2": sum(o.code != 2 for o in outcomes),
        "not_one_line": sum(len(o.lines) != 1 for o in outcomes),
        "tracebacks": sum(o.traceback for o in outcomes),
        "fix_not_named": sum(not o.needle_found for o in outcomes),
        "wrong": [dataclasses.asdict(o) for o in outcomes if not o.ok],
        "damaged_stores": len(verify),
        "damaged_stores_verified_ok": sum(code == 0 for code in verify.values()),
    }


def _fuzzed(result: dict[str, Any]) -> dict[str, Any]:
    """A fuzz run's counts, its failure counts summed, and its first failures."""
    wrong = fuzz.failure_counts(result)
    keep = ("examples", "accepted", "refused", "refused_right", "seconds")
    return {k: result[k] for k in keep if k in result} | {
        "failures": wrong,
        "wrong": sum(wrong.values()),
        "first_failures": result.get("failures", [])[:5],
    }


def run_faults(out: Path | None, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """All scenarios (quick: 3 embed kill trials instead of 20, 2 train, finetune and sweep
    kills instead of 5); the JSON document."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="carrot-faults-") as tmp:
        root = Path(tmp)
        result: dict[str, Any] = {"bad_inputs": run_bad_inputs(root / "bad")}
        result["corrupt_images"] = corrupt_images.run_corrupt_images(root / "images")
        trials = 3 if quick else 20
        result["kills"] = dataclasses.asdict(
            kills.run_kill_trials(root / "kills", trials=trials, seed=seed)
        )
        store = str(next((root / "kills" / "reference").rglob("*.zarr")))
        runs = 2 if quick else 5
        result["train_kills"] = dataclasses.asdict(
            run_kills.run_train_kills(root / "train", store, trials=runs, seed=seed)
        )
        result["finetune_kills"] = dataclasses.asdict(
            run_kills.run_finetune_kills(root / "finetune", trials=runs, seed=seed)
        )
        result["sweep_kills"] = dataclasses.asdict(
            run_kills.run_sweep_kills(root / "sweep", trials=runs, seed=seed)
        )
        result["fuzz_csv"] = _fuzzed(
            fuzz.fuzz_csv_manifests(root / "fuzz-csv", examples=40 if quick else 150, seed=seed)
        )
        result["fuzz_cli"] = _fuzzed(
            fuzz.fuzz_cli_options(root / "fuzz-cli", examples=300 if quick else 1500, seed=seed)
        )
        result["storage"] = dataclasses.asdict(storage.run_storage_faults(root / "storage"))
        result["concurrency"] = dataclasses.asdict(
            concurrency.run_concurrency(root / "concurrency")
        )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["quick"] = quick
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
    return result


def table(result: dict[str, Any]) -> str:
    """The report as a markdown table: scenario, count, target."""
    b, c, k = result["bad_inputs"], result["corrupt_images"], result["kills"]
    rows = [
        ("bad inputs tried", b["tried"], "≥ 40"),
        (
            "… refused right (exit 2, one line naming the input, no flow)",
            b["refused_right"],
            b["tried"],
        ),
        ("… exit code other than 2", b["exit_not_2"], 0),
        ("… more or less than one stderr line", b["not_one_line"], 0),
        ("… tracebacks", b["tracebacks"], 0),
        ("damaged stores that `carrot store verify` passed", b["damaged_stores_verified_ok"], 0),
        ("corrupt or odd image files embedded", c["files"], "—"),
        ("… skipped and recorded", c["skipped"], c["expected_skipped"]),
        ("… crashes", c["crashes"], 0),
        ("… ids lost on the way to predictions.csv", c["ids_lost"], 0),
        ("… `--strict` runs not refused", c["strict_not_refused"], 0),
        ("kill -9 of carrot embed: trials", k["trials"], "—"),
        ("… landed mid-write (an incomplete store left)", k["killed_mid_write"], "—"),
        ("… incomplete stores that verified", k["verified_incomplete"], 0),
        ("… stores marked complete early", k["complete_early"], 0),
        ("… reruns that failed", k["failed_reruns"], 0),
        ("… final stores not identical to the uninterrupted run", k["not_identical"], 0),
        ("… rows lost", k["lost_rows"], 0),
    ]
    for key in ("train_kills", "finetune_kills", "sweep_kills"):
        r = result[key]
        rows += [
            (
                f"kill -9 of {r['command']}: trials (killed before the end)",
                f"{r['trials']} ({r['killed']})",
                "—",
            ),
            ("… outputs seen half-written", r["half_written"], 0),
            ("… summaries claiming a killed run complete", r["complete_early"], 0),
            ("… reruns that failed", r["failed_reruns"], 0),
            ("… resumed runs with other final metrics", r["not_identical"], 0),
        ]
    fc, fo = result["fuzz_csv"], result["fuzz_cli"]
    rows += [
        (
            "fuzzed CSV manifests through carrot embed (accepted / refused)",
            f"{fc['examples']} ({fc['accepted']} / {fc['refused']})",
            "—",
        ),
        (
            "… tracebacks, exit ≠ 0/2, >1 line, complete stores of failed runs, wrong stores",
            fc["wrong"],
            0,
        ),
        ("fuzzed option strings (embed, train, predict)", fo["examples"], "—"),
        ("… not refused on one line before any flow", fo["wrong"], 0),
    ]
    st, cc = result["storage"], result["concurrency"]
    rows += [
        ("disk full / read-only trials", st["trials"], "—" if not st["not_run"] else st["not_run"]),
        (
            "… refused right (exit 2, one line naming the place and the fix)",
            st["refused_right"],
            st["trials"],
        ),
        ("… tracebacks", st["tracebacks"], 0),
        ("… stores or earlier runs corrupted, files half-written", st["corrupted"], 0),
        ("… runs that did not finish once space returned", st["failed_resumes"], 0),
        ("concurrent-writer scenarios", cc["scenarios"], "—"),
        ("… second writers not refused on one line", cc["refusals_wrong"], 0),
        ("… `--wait` runs not ending in the finished store", cc["waits_wrong"], 0),
        ("… stale locks (killed process, expired host) not recovered", cc["recoveries_wrong"], 0),
        ("… final stores not identical to a lone run's", cc["not_identical"], 0),
        ("… tracebacks", cc["tracebacks"], 0),
    ]
    lines = ["| scenario | count | target |", "|---|---|---|"]
    lines += [f"| {name} | {count} | {target} |" for name, count, target in rows]
    return "\n".join(lines)


def failures(result: dict[str, Any]) -> list[str]:
    """Each count that missed its target, as a line naming it (and the cases behind it)."""
    b, c, k = result["bad_inputs"], result["corrupt_images"], result["kills"]
    out = [f"bad input {o['name']!r}: exit {o['code']}, {o['lines'][:2]}" for o in b["wrong"]]
    if b["tried"] < 40:
        out.append(f"only {b['tried']} bad inputs tried (target ≥ 40)")
    if b["damaged_stores_verified_ok"]:
        out.append(f"{b['damaged_stores_verified_ok']} damaged store(s) passed verify")
    for key in ("crashes", "ids_lost", "strict_not_refused"):
        if c[key]:
            out.append(f"corrupt images: {key} = {c[key]} {c.get('error', '')}")
    if c["skipped"] != c["expected_skipped"]:
        out.append(f"corrupt images: skipped {c.get('skipped_ids')}")
    for key in (
        "verified_incomplete",
        "complete_early",
        "failed_reruns",
        "not_identical",
        "lost_rows",
    ):
        if k[key]:
            out.append(f"kills: {key} = {k[key]}")
    for name in ("train_kills", "finetune_kills", "sweep_kills"):
        r = result[name]
        for key in ("half_written", "complete_early", "failed_reruns", "not_identical"):
            if r[key]:
                out.append(f"{r['command']} kills: {key} = {r[key]}: {r['details']}")
    for key in ("fuzz_csv", "fuzz_cli"):
        if result[key]["wrong"]:
            out.append(f"{key}: {result[key]['failures']}: {result[key]['first_failures']}")
    st, cc = result["storage"], result["concurrency"]
    for key in ("wrong_refusals", "tracebacks", "corrupted", "failed_resumes"):
        if st[key]:
            out.append(f"storage: {key} = {st[key]}: {st['details']}")
    for key in ("refusals_wrong", "waits_wrong", "recoveries_wrong", "not_identical", "tracebacks"):
        if cc[key]:
            out.append(f"concurrency: {key} = {cc[key]}: {cc['details']}")
    return out
