"""Saved heads and run folders: corrupt files are refused clearly; a run folder is replaced as a
whole (a kill -9 at any moment leaves the complete old run or the complete new one)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.heads.bank import Head
from pipeline.heads.io import CONFIG_FILE, WEIGHTS_FILE, load_head, save_head

ROOT = Path(__file__).resolve().parents[2]


def _saved_head(path: Path, dim: int = 6, classes: int = 3) -> Path:
    torch.manual_seed(0)
    save_head(Head(dim, classes), path, class_names=[f"c{i}" for i in range(classes)])
    return path


def test_saved_head_round_trips(tmp_path):
    """Every tensor (LayerNorm affine included, moved off its init), the eps and the logits
    come back exactly."""
    torch.manual_seed(0)
    saved = Head(6, 3)
    with torch.no_grad():
        for p in saved.parameters():
            p.copy_(torch.randn_like(p))
    save_head(saved, tmp_path, class_names=["c0", "c1", "c2"])
    head, config = load_head(tmp_path)
    assert (head.dim, head.num_classes) == (6, 3) and config["class_names"] == ["c0", "c1", "c2"]
    assert head.state_dict().keys() == saved.state_dict().keys()
    for name, tensor in saved.state_dict().items():
        assert torch.equal(head.state_dict()[name], tensor), name
    assert head.norm.eps == saved.norm.eps and not head.training
    x = torch.randn(5, 6)
    assert torch.equal(head(x), saved(x))


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda d: (d / CONFIG_FILE).write_text('{"format_version": 1, "dim": '), CONFIG_FILE),
        (lambda d: (d / CONFIG_FILE).write_text('{"format_version": 1}'), CONFIG_FILE),
        (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), CONFIG_FILE),
        (lambda d: (d / CONFIG_FILE).write_bytes(b"\xff\xfe\x00garbage"), CONFIG_FILE),
        (lambda d: _edit_config(d, dim="six"), CONFIG_FILE),
        (lambda d: _edit_config(d, class_names=["a"]), CONFIG_FILE),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"not a safetensors file at all"), WEIGHTS_FILE),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE),
        (lambda d: _other_weights(d, dim=7), WEIGHTS_FILE),
    ],
)
def test_corrupt_head_is_an_input_error_naming_the_file(tmp_path, corrupt, needle):
    _saved_head(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(InputError) as e:
        load_head(tmp_path)
    msg = str(e.value)
    assert needle in msg and "carrot train" in msg and "\n" not in msg


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg.update(changes)
    (d / CONFIG_FILE).write_text(json.dumps(cfg))


def _other_weights(d: Path, *, dim: int) -> None:
    """Weights of another shape under the old config (e.g. files copied from two runs)."""
    other = _saved_head(d / "other", dim=dim)
    (d / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())


def test_weights_of_another_save_are_refused(tmp_path):
    """Same shapes, other values: config.json records the weights' sha256."""
    _saved_head(tmp_path / "a")
    torch.manual_seed(1)
    save_head(Head(6, 3), tmp_path / "b", class_names=["c0", "c1", "c2"])
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(InputError, match="sha256"):
        load_head(tmp_path / "a")


# --------------------------------------------------------------------------- kill -9 while writing

_HOST = textwrap.dedent(
    """
    import hashlib, json, os, shutil, signal, sys, time
    import numpy as np, torch
    torch.set_num_threads(1)
    from pipeline.heads.features import FeatureSet
    from pipeline.heads.io import write_outputs
    from pipeline.heads.bank import HeadSpec
    from pipeline.heads.search import TrainConfig, train_head_bank

    work, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)

    def result(tag):
        r = np.random.default_rng(tag)
        y = r.integers(0, 3, 90)
        X = (r.standard_normal((3, 8))[y] + r.standard_normal((90, 8))).astype(np.float32)
        fs = FeatureSet.from_arrays({"train": (X, y), "val": (X, y), "test": (X, y)})
        return train_head_bank(fs, [HeadSpec(lr=1e-2)], TrainConfig(epochs=2 + tag))

    results = [result(0), result(1)]
    def write(i, out):
        write_outputs(results[i % 2], out, class_names=["a", "b", "c"], store_key=f"run{i % 2}")

    for i in (0, 1):  # reference folders, written once without interruption
        write(i, os.path.join(work, f"ref{i}"))
    out = os.path.join(work, "out")
    t0 = time.perf_counter(); write(0, out); dur = time.perf_counter() - t0
    for k in range(kills):
        pid = os.fork()
        if pid == 0:  # the writer: new runs over the folder until killed
            i = 1
            while True:
                write(i, out); i += 1
        time.sleep(float(rng.uniform(0.0, 2.5 * dur)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        snap = os.path.join(work, f"snap{k}")
        if os.path.isdir(out):
            shutil.copytree(out, snap)
    print(json.dumps({"kills": kills, "write_s": dur}))
    """
)


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_kill_9_while_writing_leaves_the_old_or_the_new_run(tmp_path):
    """A real writer process, killed with SIGKILL at seeded random moments of its write loop."""
    kills = 12
    r = subprocess.run(
        [sys.executable, "-c", _HOST, str(tmp_path), str(kills), "20261201"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    refs = [_digests(tmp_path / f"ref{i}") for i in (0, 1)]
    assert refs[0].keys() == refs[1].keys() and refs[0] != refs[1]
    for k in range(kills):
        snap = tmp_path / f"snap{k}"
        assert snap.is_dir(), f"kill {k}: the run folder is gone"
        got = _digests(snap)
        which = {n: [i for i in (0, 1) if refs[i].get(n) == b] for n, b in got.items()}
        assert got in refs, f"kill {k}: a mix of runs (file: matching runs): {which}"
        _, config = load_head(snap)
        assert config["store"]["key"] == f"run{refs.index(got)}"
    # each write removes what killed writers left beside the folder
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")]
    assert len(left) <= 1, left  # the last killed writer's staging folder at most


def test_a_new_run_keeps_files_it_does_not_own(tmp_path):
    """Files the user (or carrot predict) put in the folder survive a new run in it."""
    from pipeline.heads.io import publish_run

    out = tmp_path / "run"
    publish_run(out, lambda d: (d / "summary.json").write_text("{}"))
    (out / "predictions-other.csv").write_text("id\n1\n")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    publish_run(out, lambda d: (d / "summary.json").write_text('{"run": 2}'))
    assert (out / "summary.json").read_text() == '{"run": 2}'
    assert (out / "predictions-other.csv").read_text() == "id\n1\n"
    assert (out / "notes" / "a.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_publish_run_over_a_file_is_an_input_error(tmp_path):
    from pipeline.heads.io import publish_run

    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        publish_run(tmp_path / "f", lambda d: None)
    assert (tmp_path / "f").read_text() == "x"


class _FailingIds(list):
    """Ids that fail when row ``fail_at`` is written (a failure midway through the file)."""

    def __init__(self, n: int, fail_at: int) -> None:
        super().__init__(f"id{i}" for i in range(n))
        self.fail_at = fail_at

    def __getitem__(self, i):
        if i == self.fail_at:
            raise OSError("disk gone")
        return super().__getitem__(i)


def test_predictions_csv_is_replaced_atomically(tmp_path):
    """A failure midway leaves the previous CSV, not a partial one."""
    from pipeline.heads.predict import write_predictions_csv

    path = tmp_path / "p.csv"
    probs = np.full((4, 2), 0.5, np.float32)
    write_predictions_csv(path, probs=probs, class_names=["a", "b"])
    before = path.read_text()
    with pytest.raises(OSError, match="disk gone"):
        write_predictions_csv(path, probs=probs, class_names=["a", "b"], ids=_FailingIds(4, 2))
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]


def test_predictions_csv_refuses_labels_outside_the_classes(tmp_path):
    from pipeline.heads.predict import write_predictions_csv

    probs = np.full((4, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="labels outside"):
        write_predictions_csv(
            tmp_path / "p.csv", probs=probs, class_names=["a", "b"], labels=np.array([0, 1, 5, 0])
        )
    assert not list(tmp_path.iterdir())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_rename_switch_where_no_exchange_exists(tmp_path, monkeypatch):
    """Without renameat2 (not Linux) the switch is two renames; the result is the same."""
    import pipeline.heads.io as head_io

    monkeypatch.setattr(head_io, "_exchange", lambda a, b: False)
    out = tmp_path / "run"
    head_io.publish_run(out, lambda d: (d / "summary.json").write_text("1"))
    (out / "mine.txt").write_text("mine")
    head_io.publish_run(out, lambda d: (d / "summary.json").write_text("2"))
    assert (out / "summary.json").read_text() == "2" and (out / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_switch_killed_between_two_renames_is_repaired(tmp_path):
    """``<out>.old-<dead pid>`` and no ``<out>``: the old run (and the user's files in it) is put
    back before the next run is published over it; the half-switched new run is dropped."""
    from pipeline.heads.io import publish_run

    out = tmp_path / "run"
    pid = _dead_pid()
    old = tmp_path / f"run.old-{pid}"
    old.mkdir()
    (old / "summary.json").write_text("old")
    (old / "mine.txt").write_text("mine")
    (tmp_path / f"run.tmp-{pid}").mkdir()
    (tmp_path / f"run.tmp-{pid}" / "summary.json").write_text("half")

    def failing(d: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_run(out, failing)
    assert (out / "summary.json").read_text() == "old"  # the old run is back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    publish_run(out, lambda d: (d / "summary.json").write_text("new"))
    assert (out / "summary.json").read_text() == "new" and (out / "mine.txt").read_text() == "mine"
