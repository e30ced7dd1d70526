"""Backbone comparison sweeps: stage 1 and stage 2 for each backbone, then one comparison table.

Per backbone (a row): parameters, embedding width, images/s (from the store's own extraction
record), the converged linear probe's test top-1 and mean per-class accuracy, the weighted k-NN
top-1 (`pipeline.evaluation.knn`, k = 10 and 20), the paired test difference between the best
CARROT head and the best plain head (each chosen on validation) with its 95 % interval, and
wall time. A backbone that fails (unknown name, bad checkpoint, out of memory) is a row with its
error; the others go on. A rerun reuses stores by content key (stage 1 is a cache hit) and
finished rows by (store key, probe settings): only what is missing is redone.

The spec comes from the command line or a versioned TOML file (`SweepSpec.from_toml`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import InputError

SPEC_VERSION = 1
ROW_FIELDS = (
    "backbone",
    "params_m",
    "dim",
    "images_per_s",
    "probe_top1",
    "probe_mean_per_class",
    "knn10_top1",
    "knn20_top1",
    "carrot_minus_plain",
    "carrot_minus_plain_lo",
    "carrot_minus_plain_hi",
    "best_head",
    "cache_hit",
    "seconds",
    "store",
    "error",
)


@dataclass(frozen=True)
class SweepSpec:
    """What to compare: ``backbones`` over ``data``, stage 2 with ``augs``; ``root`` for stores,
    ``out`` for the comparison (CSV, JSON, chart, one JSON per finished row)."""

    data: str
    backbones: tuple[str, ...]
    augs: tuple[str, ...] = ("none", "carrot")
    root: str | None = None  # default: $CARROT_HOME/stores
    out: str | None = None  # default: $CARROT_HOME/sweeps/<data>
    image_size: int | None = None
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    shots: tuple[int, ...] = ()  # few-shot probes: k labelled images per class, each k a column
    seeds: int = 3  # few-shot draws per k (mean and std over them)
    version: int = SPEC_VERSION

    def __post_init__(self) -> None:
        if not self.backbones:
            raise InputError("sweep: no backbones; give --backbones a,b,c (timm model names)")
        if len(set(self.backbones)) != len(self.backbones):
            raise InputError(f"sweep: a backbone is listed twice in {','.join(self.backbones)}")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.shots):
            raise InputError(f"sweep: --shots {list(self.shots)}: give positive integers")
        if len(set(self.shots)) != len(self.shots):
            raise InputError(f"sweep: a shot count is listed twice in {list(self.shots)}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise InputError(f"sweep: seeds = {self.seeds!r}: give a positive integer")
        if not self.augs or "none" not in self.augs:
            raise InputError("sweep: --aug must include 'none' (the plain heads)")
        if self.version != SPEC_VERSION:
            raise InputError(
                f"sweep spec version {self.version} is not supported (this carrot reads "
                f"version {SPEC_VERSION}); update the file's 'version' and its keys"
            )

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> SweepSpec:
        """Read a spec file: top-level keys are the fields (``backbones`` and ``augs`` lists);
        ``overrides`` (not None) win. Unknown keys are an `InputError` naming them."""
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"--config {str(path)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"--config {str(path)!r} is not valid TOML: {e}") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(
                f"--config {str(path)!r}: unknown keys {unknown}; known: {sorted(known)}"
            )
        if "version" not in raw:
            raise InputError(f"--config {str(path)!r}: add 'version = {SPEC_VERSION}'")
        raw |= {k: v for k, v in overrides.items() if v is not None}
        for name in ("backbones", "augs", "shots"):
            if name in raw:
                if not isinstance(raw[name], list | tuple):
                    raise InputError(
                        f"--config {str(path)!r}: '{name}' must be a list, e.g. {name} = [...]"
                    )
                raw[name] = tuple(raw[name])
        if "data" not in raw or "backbones" not in raw:
            raise InputError(f"--config {str(path)!r}: needs 'data' and 'backbones'")
        return cls(**raw)

    def probe_key(self) -> str:
        """What a finished row depends on besides its store: the stage-2 settings."""
        from pipeline.defaults import DEFAULT_LRS, DEFAULT_WEIGHT_DECAYS

        settings: dict[str, Any] = {
            "augs": self.augs,
            "lrs": DEFAULT_LRS,
            "wds": DEFAULT_WEIGHT_DECAYS,
            "seed": self.seed,
        }
        if self.shots:  # only then, so the rows of sweeps without few-shot keep their keys
            settings |= {"shots": self.shots, "seeds": self.seeds}
        text = json.dumps(settings)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def row_fields(shots: Sequence[int] = ()) -> tuple[str, ...]:
    """The columns of a sweep's table: `ROW_FIELDS`, then per few-shot k its mean top-1 and
    its std over seeds (``shots5_top1``, ``shots5_top1_std``) before ``cache_hit``."""
    few = tuple(f"shots{k}_top1{s}" for k in shots for s in ("", "_std"))
    cut = ROW_FIELDS.index("best_head") + 1
    return ROW_FIELDS[:cut] + few + ROW_FIELDS[cut:]


@dataclass
class SweepResult:
    """Rows in spec order (failed backbones included, with ``error``) and where they went."""

    rows: list[dict[str, Any]]
    out: Path
    files: dict[str, str] = field(default_factory=dict)
    fields: tuple[str, ...] = ROW_FIELDS  # the table's columns (`row_fields`)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("error")]


def run_backbone(
    spec: SweepSpec, backbone: str, *, embed: Callable[[Any], Any] | None = None
) -> dict[str, Any]:
    """One row: embed (or reuse) the store, probe it, k-NN, CARROT vs plain. Raises on failure
    (`sweep` turns that into an error row). ``embed`` runs the stage-1 settings (default:
    `pipeline.embed.run.run_embedding`; the flow passes its own)."""
    from pipeline.embed.backbone import BackboneConfig
    from pipeline.embed.extract import ExtractConfig
    from pipeline.embed.run import EmbedSettings, check_settings, default_root, run_embedding

    t0 = time.perf_counter()
    settings = EmbedSettings(
        data=spec.data,
        backbone=BackboneConfig(
            name=backbone, seed=spec.seed, image_size=spec.image_size, device=spec.device
        ),
        extract=ExtractConfig(batch_size=spec.batch_size),
        root=spec.root or default_root(),
    )
    check_settings(settings)
    summary = (embed or run_embedding)(settings)
    summary = summary if isinstance(summary, dict) else summary.to_dict()
    row = probe_row(spec, summary["store"])
    return row | {
        "backbone": backbone,
        "params_m": parameter_count(backbone) / 1e6,
        "cache_hit": bool(summary["cache_hit"]),
        "seconds": round(time.perf_counter() - t0, 2),
        "store": summary["store"],
        "error": None,
    }


def probe_row(spec: SweepSpec, store_url: str) -> dict[str, Any]:
    """Stage 2 and k-NN over a finished store (fields of a row; no backbone work)."""
    from pipeline.evaluation.knn import knn_accuracy
    from pipeline.heads.features import FeatureSet
    from pipeline.heads.probe import ProbeSettings, run_probe
    from stores import open_store

    store = open_store(store_url)
    features = FeatureSet.from_store(store, device="cpu")
    report = run_probe(features, ProbeSettings(augs=spec.augs))
    train, test = features.splits["train"], features.splits["test"]
    knn = knn_accuracy(
        train.X, train.y, test.X, test.y, num_classes=len(store.class_names), ks=(10, 20)
    )
    diff = carrot_vs_plain(report.result, test.X, test.y) if "carrot" in spec.augs else None
    few: dict[str, Any] = {}
    for k in spec.shots:
        shot = run_probe(
            features, ProbeSettings(augs=spec.augs, shots=k, seeds=tuple(range(spec.seeds)))
        ).summary
        few[f"shots{k}_top1"], few[f"shots{k}_top1_std"] = shot["top1"], shot["std"]["top1"]
    timings = store.attrs.get("timings") or {}
    rate = (
        timings.get("images", 0) / timings["extract_seconds"]
        if timings.get("extract_seconds")
        else None
    )
    s = report.summary
    best = s["best_head"]
    return {
        "dim": int(store.dim),
        "images_per_s": None if rate is None else round(rate, 1),
        "probe_top1": s["top1"],
        "probe_mean_per_class": s["mean_per_class"],
        "knn10_top1": knn[10],
        "knn20_top1": knn[20],
        "carrot_minus_plain": None if diff is None else diff[0],
        "carrot_minus_plain_lo": None if diff is None else diff[1],
        "carrot_minus_plain_hi": None if diff is None else diff[2],
        "best_head": f"{best['aug']} λ={best['weight_decay']:g}",
        "store_key": store.key,
    } | few


def carrot_vs_plain(result: Any, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """Paired test difference (a fraction) between the best CARROT head and the best plain head,
    each chosen on validation by `select_best` within its kind, with the 95 % normal interval
    of the mean per-row difference of their correctness."""
    from pipeline.heads.train import select_best

    plain = [i for i, s in enumerate(result.specs) if s.aug == "none"]
    carrot = [i for i, s in enumerate(result.specs) if s.aug == "carrot"]
    if not plain or not carrot:
        raise ValueError("carrot_vs_plain needs plain and CARROT heads")
    pick = [h[select_best([result.val[i] for i in h])] for h in (plain, carrot)]
    with torch.no_grad():
        logits = result.bank(X.to(result.bank.weight.device))  # (H, N, C)
        hits = (logits[pick].argmax(-1).cpu() == y.cpu()).double()  # (2, N)
    d = (hits[1] - hits[0]).numpy()
    mean = float(d.mean())
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return mean, mean - half, mean + half


def parameter_count(backbone: str) -> int:
    """Parameters of the timm model (feature extractor, ``num_classes=0``), built on the meta
    device: no memory, no weights."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters())


RunAll = Callable[["SweepSpec", list[str]], Iterator[tuple[str, "dict[str, Any] | BaseException"]]]
"""Runs the named backbones (e.g. one Dask task each), yielding (backbone, row or the error it
raised) as each finishes, in any order."""


def run_in_turn(
    run: Callable[[SweepSpec, str], dict[str, Any]] = run_backbone,
) -> RunAll:
    """A `RunAll` that calls ``run`` for one backbone after the other, in this process."""

    def run_all(
        spec: SweepSpec, backbones: list[str]
    ) -> Iterator[tuple[str, dict[str, Any] | BaseException]]:
        for backbone in backbones:
            try:
                yield backbone, run(spec, backbone)
            except Exception as e:  # any failure of one backbone is its row; Ctrl-C still stops
                yield backbone, e

    return run_all


def sweep(spec: SweepSpec, *, run_all: RunAll | None = None, out: Path) -> SweepResult:
    """Every backbone of ``spec`` through ``run_all`` (default: `run_backbone` in turn), reusing
    finished rows under ``out/rows`` and saving each new one as soon as it arrives (a crash
    keeps them); then the table files (`write_outputs`). Rows are in spec order."""
    rows: dict[str, dict[str, Any]] = {}
    for backbone in spec.backbones:
        cached = _cached_row(out, spec, backbone)
        if cached is not None:
            rows[backbone] = cached | {"reused": True}
    todo = [b for b in spec.backbones if b not in rows]
    for backbone, outcome in (run_all or run_in_turn())(spec, todo):
        if isinstance(outcome, BaseException):
            rows[backbone] = error_row(backbone, outcome)
            continue
        _save_row(out, spec, outcome)
        rows[backbone] = outcome | {"reused": False}
    result = SweepResult([rows[b] for b in spec.backbones], out, fields=row_fields(spec.shots))
    result.files = write_outputs(result)
    return result


def error_row(backbone: str, error: BaseException) -> dict[str, Any]:
    """The row of a backbone that failed: its name and the error, one line."""
    from pipeline.terminal import printable

    text = str(error) if isinstance(error, InputError) else f"{type(error).__name__}: {error}"
    return {name: None for name in ROW_FIELDS} | {
        "backbone": backbone,
        "error": printable(text.splitlines()[0] if text else type(error).__name__),
    }


def _file_name(text: str) -> str:
    """``text`` with every character but letters, digits and ``-_.`` replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _row_path(out: Path, spec: SweepSpec, backbone: str, store_key: str) -> Path:
    return out / "rows" / f"{_file_name(backbone)}-{store_key[:12]}-{spec.probe_key()}.json"


def _cached_row(out: Path, spec: SweepSpec, backbone: str) -> dict[str, Any] | None:
    """A finished row of this backbone whose store still exists with the same key."""
    from stores import open_store

    pattern = f"{_file_name(backbone)}-*-{spec.probe_key()}.json"
    for path in sorted((out / "rows").glob(pattern)):
        try:
            row = json.loads(path.read_text())
            store = open_store(row["store"])
        except (OSError, ValueError, KeyError, InputError):
            continue
        if store.key == row.get("store_key") and row.get("backbone") == backbone:
            return row
    return None


def _save_row(out: Path, spec: SweepSpec, row: dict[str, Any]) -> None:
    path = _row_path(out, spec, row["backbone"], row["store_key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=2))
    tmp.replace(path)


def default_out(spec: SweepSpec) -> Path:
    """``$CARROT_HOME/sweeps/<data>`` (the DATA argument made a folder name)."""
    from pipeline.home import carrot_home

    return carrot_home() / "sweeps" / (_file_name(spec.data.strip("/"))[-80:] or "data")


def write_outputs(result: SweepResult) -> dict[str, str]:
    """``sweep.csv``, ``sweep.json`` and ``sweep.png`` (bar chart) under ``result.out``, each
    written atomically (`pipeline.heads.io.atomic_file`): a reader sees the old file or the new."""
    from pipeline.heads.io import atomic_file, write_json

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = out / "sweep.csv", out / "sweep.json", out / "sweep.png"
    with atomic_file(csv_path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=result.fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result.rows)
    write_json(json_path, {"rows": result.rows})
    with atomic_file(png_path) as tmp:
        _chart(result.rows, tmp)
    return {"csv": str(csv_path), "json": str(json_path), "png": str(png_path)}


def _chart(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Linear-probe and k-NN top-1 per backbone (a failed backbone keeps its place, no bars)."""
    from pipeline.plots import plot_method_comparison

    bars = [
        {"regime": r["backbone"], "method": label, "top1": r.get(key)}
        for r in rows
        for key, label in (("probe_top1", "linear probe"), ("knn20_top1", "k-NN, k = 20"))
    ]
    plot_method_comparison(bars, path)


def format_rows(rows: Sequence[dict[str, Any]], shots: Sequence[int] = ()) -> list[str]:
    """The comparison as aligned text lines (percentages; '—' where not measured; a failed
    backbone is its name and the error); a column per few-shot k: mean ± std over seeds."""

    def pct(v: Any) -> str:
        return "—" if v is None else f"{100 * v:.1f}"

    def diff(r: dict[str, Any]) -> str:
        if r.get("carrot_minus_plain") is None:
            return "—"
        lo, hi = r["carrot_minus_plain_lo"], r["carrot_minus_plain_hi"]
        return f"{100 * r['carrot_minus_plain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"

    head = ("backbone", "params M", "D", "img/s", "probe %", "mean/class %", "kNN10 %")
    head += ("kNN20 %", "CARROT − plain", *(f"{k}-shot %" for k in shots), "s")
    table = [head]

    def few(r: dict[str, Any], k: int) -> str:
        mean, std = r.get(f"shots{k}_top1"), r.get(f"shots{k}_top1_std")
        return "—" if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0):.1f}"

    for r in rows:
        if not r.get("error"):
            rate = "—" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}"
            seconds = f"{r['seconds']:.1f}" + (" (reused)" if r.get("reused") else "")
            table.append(
                (
                    r["backbone"],
                    f"{r['params_m']:.2f}",
                    str(r["dim"]),
                    rate,
                    pct(r["probe_top1"]),
                    pct(r["probe_mean_per_class"]),
                    pct(r["knn10_top1"]),
                    pct(r["knn20_top1"]),
                    diff(r),
                    *(few(r, k) for k in shots),
                    seconds,
                )
            )
    widths = [max(len(line[i]) for line in table) for i in range(len(head))]
    names = max([widths[0]] + [len(r["backbone"]) for r in rows])
    widths[0] = names

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head)]
    done = iter(table[1:])
    for r in rows:
        out.append(
            f"{r['backbone']:<{names}}  error: {r['error']}" if r.get("error") else line(next(done))
        )
    return out
