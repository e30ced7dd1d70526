"""Save and load a trained head (``head.safetensors`` + ``config.json``), and write a run's
output folder as a whole.

Every file is written to a temporary name beside its target, flushed to disk and moved into place
with ``os.replace`` (`atomic_file`); a run folder is filled as a new sibling folder and then
switched in with one atomic directory exchange (`publish_run`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.defaults import LN_EPS
from pipeline.errors import InputError
from pipeline.heads.bank import Head, HeadSpec
from stores.errors import storage_errors
from stores.location import write_denied

if TYPE_CHECKING:
    from pipeline.heads.fewshot import FewShotResult
    from pipeline.heads.search import TrainResult

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: Linear with bias; the LayerNorm affine holds the input standardization
WEIGHTS_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
# The files a run folder consists of: a new run replaces all of them (those it does not write
# are gone afterwards); anything else in the folder is the user's and is kept.
RUN_FILES = frozenset(
    {
        WEIGHTS_FILE,
        CONFIG_FILE,
        "metrics.json",
        "predictions.csv",
        "learning_curves.png",
        "confusion.png",
        "summary.json",
        "top.safetensors",  # partially frozen runs (pipeline.heads.top)
        "top.json",
        "model.safetensors",  # fine-tuned backbone (pipeline.finetune: its best/ folder)
        "best.json",
        "head",
    }
)
SEED_DIR = re.compile(r"^seed-\d+$")  # few-shot runs: one head folder per seed (also run files)
_REWRITE = "re-run carrot train to write the head again"
_KEPT = "a run already in that folder is left as it was"

# The head does its own normalization; features go in exactly as the store holds them.
FEATURE_NORMALIZATION = {
    "input": "raw store features, float32, no external normalization",
    "head": "LayerNorm over the feature dimension (affine: standardizes the normalized "
    "features by the train split's mean and std), then Linear with bias",
    "layernorm_eps": LN_EPS,
}

T = TypeVar("T")


# --------------------------------------------------------------------------- single files


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, hidden name); when the block ends
    without error the file is fsynced and moved onto ``path`` with ``os.replace``, otherwise
    removed. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(3)}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_safetensors(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write ``state`` (contiguous CPU tensors) as safetensors to ``path`` atomically, through
    Python's own file writes (a full disk raises `OSError` with its errno, which safetensors'
    writer hides); returns the file's sha256 (hex)."""
    data = safetensors_bytes(state, metadata=metadata)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically; returns ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- the head


def save_head(
    head: Head,
    out_dir: str | Path,
    *,
    class_names: Sequence[str],
    spec: HeadSpec | None = None,
    store_key: str | None = None,
    store_url: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``head.safetensors`` and ``config.json`` (D, C, class names, spec, store, feature
    normalization, the weights' sha256) into ``out_dir``; returns ``out_dir``.

    Each file is replaced atomically; the sha256 lets `load_head` refuse a weights file that is
    not the one this config was written with (e.g. a save cut short between the two files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(class_names) != head.num_classes:
        raise InputError(
            f"{len(class_names)} class names for a head with {head.num_classes} classes"
        )
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()
    }
    weights_sha = write_safetensors(
        out / WEIGHTS_FILE, state, metadata={"format_version": str(FORMAT_VERSION)}
    )
    config = {
        "format_version": FORMAT_VERSION,
        "dim": head.dim,
        "num_classes": head.num_classes,
        "class_names": list(class_names),
        "spec": spec.to_dict() if spec is not None else None,
        "store": {"key": store_key, "url": store_url},
        "feature_normalization": FEATURE_NORMALIZATION,
        "weights_sha256": weights_sha,
        **(extra or {}),
    }
    write_json(out / CONFIG_FILE, config)
    return out


def load_head(
    path: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[Head, dict[str, Any]]:
    """Load a head written by `save_head` → ``(head in eval mode, config dict)``.

    Raises InputError naming the file when the folder is not a saved head, ``config.json`` is not
    valid (truncated JSON, missing or wrong keys) or ``head.safetensors`` is not (garbage, other
    shapes, or not the weights this config was saved with)."""
    p = Path(path)
    cfg_path, w_path = p / CONFIG_FILE, p / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise InputError(
            f"{p} is not a saved head: expected {CONFIG_FILE} and {WEIGHTS_FILE} in it; give a "
            "folder written by carrot train"
        )
    config = read_head_config(p)
    dim, num_classes = config["dim"], config["num_classes"]
    eps = config["feature_normalization"]["layernorm_eps"]
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(
            f"{w_path} is not a readable safetensors file ({_first_line(e)}); {_REWRITE}"
        ) from None
    head = Head(dim, num_classes, eps=eps)
    try:
        head.load_state_dict(state)
    except RuntimeError:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise InputError(
            f"{w_path} holds tensors {shapes}, not a head of D={dim}, C={num_classes} as "
            f"{cfg_path} says; {_REWRITE}"
        ) from None
    expected = config.get("weights_sha256")
    if expected is not None and _sha256(w_path) != expected:
        raise InputError(
            f"{w_path} does not match {cfg_path} (sha256 differs: the folder mixes files of two "
            f"saves); {_REWRITE}"
        )
    return head.to(device).eval(), config


def read_head_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of the saved head in folder ``path``, checked (no weights read): ``dim``
    and ``num_classes`` positive ints, ``class_names`` C strings, a positive LayerNorm eps."""
    cfg_path = Path(path) / CONFIG_FILE
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(
            f"{cfg_path}: no such file; give a folder written by carrot train"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{cfg_path} is not valid JSON ({_first_line(e)}); {_REWRITE}") from None
    if not isinstance(config, dict):
        raise InputError(f"{cfg_path} holds a {type(config).__name__}, not an object; {_REWRITE}")
    if config.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"{cfg_path} has format_version {config.get('format_version')!r}; this code reads "
            f"{FORMAT_VERSION}; {_REWRITE}"
        )
    for key in ("dim", "num_classes"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(
                f"{cfg_path}: {key!r} must be a positive integer, got {value!r}; {_REWRITE}"
            )
    names = config.get("class_names")
    if (
        not isinstance(names, list)
        or len(names) != config["num_classes"]
        or not all(isinstance(n, str) for n in names)
    ):
        raise InputError(
            f"{cfg_path}: 'class_names' must be a list of {config['num_classes']} names, got "
            f"{_short(names)}; {_REWRITE}"
        )
    norm = config.get("feature_normalization", {})
    eps = norm.get("layernorm_eps", LN_EPS) if isinstance(norm, dict) else None
    if (
        not isinstance(eps, int | float)
        or isinstance(eps, bool)
        or not math.isfinite(eps)
        or eps <= 0
    ):
        raise InputError(
            f"{cfg_path}: feature_normalization.layernorm_eps must be a positive number, got "
            f"{eps!r}; {_REWRITE}"
        )
    config["feature_normalization"] = {**(norm or {}), "layernorm_eps": float(eps)}
    return config


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- run folders


def check_out_dir(out_dir: str | Path, *, option: str = "--out") -> Path:
    """Check, before any work, that a run can be published at ``out_dir``: it is absent or a
    folder, not a mount point, and it and the folder it will be created in are writable (a
    temporary file is created and removed in each). Returns the absolute path."""
    out = _absolute(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out_dir}: exists and is not a folder; give a folder path")
    if out.is_dir() and os.path.ismount(out):
        raise InputError(f"{option} {out_dir}: is a mount point; give a folder inside it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{option} {out_dir}: {parent} is not a folder; give another path")
    for folder in (parent, out) if out.is_dir() else (parent,):
        _check_writable(folder, option=option, given=out_dir)
    return out


def check_out_file(path: str | Path, *, option: str = "--out") -> Path:
    """Check, before any work, that a file can be written at ``path``: not a folder, and its
    folder exists and is writable. Returns the absolute path."""
    out = _absolute(path)
    if out.is_dir():
        raise InputError(f"{option} {path}: is a folder; give a file path")
    if not out.parent.is_dir():
        raise InputError(f"{option} {path}: {out.parent} is not a folder; create it first")
    _check_writable(out.parent, option=option, given=path)
    return out


def _check_writable(folder: Path, *, option: str, given: str | Path) -> None:
    e = write_denied(folder)
    if e is not None:
        raise InputError(
            f"{option} {given}: cannot write in {folder} ({e.strerror or e}); give a writable "
            "folder"
        )


def publish_run(out_dir: str | Path, write: Callable[[Path], T]) -> T:
    """Write a run folder as a whole: ``write(staging)`` fills a new sibling folder
    ``<out>.tmp-<pid>``; entries of an existing ``out_dir`` that are not run files
    (`RUN_FILES`) are hard-linked into it; then it takes ``out_dir``'s place in one atomic
    exchange (Linux ``renameat2(RENAME_EXCHANGE)``) and the old run is deleted. Returns what
    ``write`` returned.

    Why a folder switch and not a manifest of checksums: with the switch every reader (`load_head`,
    a user's ``cp`` or plotting script) sees the complete old run or the complete new one without
    checking anything, and a run that stops midway leaves the previous run untouched; a manifest
    would only let readers that check it notice a mixed folder after the fact, and could not give
    the previous run back. Where the exchange is not available (not Linux) two renames are used:
    a kill between them leaves ``<out>.old-<pid>``, which the next publish puts back.
    Stale ``<out>.tmp-<pid>`` / ``<out>.old-<pid>`` folders of dead processes are removed first.
    """
    out = check_out_dir(out_dir)
    _clean_stale(out)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # a failed earlier attempt of this process
    try:
        with storage_errors(f"run folder {out}", then=_KEPT):
            staging.mkdir(parents=True)
            value = write(staging)
            if out.is_dir():
                _carry_over(out, staging)
            _fsync(staging, directory=True)
            _switch_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return value


def _absolute(path: str | Path) -> Path:
    p = Path(path).expanduser()
    p = p if p.is_absolute() else Path.cwd() / p
    return p.resolve() if p.is_symlink() else Path(os.path.normpath(p))


_SIBLING = re.compile(r"\.(tmp|old)-(\d+)$")


def _clean_stale(out: Path) -> None:
    """Remove what dead writers left beside ``out``; put an ``.old-`` run back if ``out`` is
    missing (a two-rename switch killed halfway)."""
    if not out.parent.is_dir():
        return
    for entry in sorted(out.parent.glob(glob.escape(out.name) + ".*-*")):
        m = _SIBLING.search(entry.name)
        if not m or entry.name[: m.start()] != out.name or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            os.rename(entry, out)
            logger.warning("restored %s from %s (its writer was killed)", out, entry)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_run_temp(name: str) -> bool:
    """Temporaries of run files (``.metrics.tmp-…json``, ``config.json.tmp``)."""
    if name.endswith(".tmp") and name[:-4] in RUN_FILES:
        return True
    return (
        name.startswith(".")
        and ".tmp-" in name
        and any(name.startswith("." + Path(f).stem + ".tmp-") for f in RUN_FILES)
    )


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) every entry of ``old`` that is not a run file into ``new``."""
    for entry in old.iterdir():
        target = new / entry.name
        run_file = entry.name in RUN_FILES or SEED_DIR.match(entry.name) is not None
        if run_file or _is_run_temp(entry.name) or target.exists():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(target))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _switch_in(staging: Path, out: Path) -> None:
    """Make ``staging`` be ``out``; delete the run that was there."""
    if not out.exists():
        try:
            os.rename(staging, out)
            _fsync(out.parent, directory=True)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if _exchange(staging, out):  # staging now holds the old run
        _fsync(out.parent, directory=True)
        shutil.rmtree(staging, ignore_errors=True)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(staging, out)
    _fsync(out.parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --------------------------------------------------------------------------- a run's outputs


def write_outputs(
    result: TrainResult,
    out_dir: str | Path,
    *,
    ids: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    store_key: str | None = None,
    store_url: str | None = None,
    extra_json: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write a run's folder as a whole (`publish_run`): head.safetensors, config.json,
    metrics.json, predictions.csv (test split), learning_curves.png, confusion.png, and
    ``extra_json`` (file name → object, e.g. ``{"summary.json": ...}``). Returns name → final
    path."""
    written = publish_run(
        out_dir,
        lambda staging: _write_run(
            result,
            staging,
            ids=ids,
            class_names=class_names,
            store_key=store_key,
            store_url=store_url,
            extra_json=extra_json or {},
        ),
    )
    out = _absolute(out_dir)
    logger.info("wrote outputs to %s", out)
    return {k: out / p.name for k, p in written.items()}


def _write_run(
    result: TrainResult,
    out: Path,
    *,
    ids: Sequence[str] | None,
    class_names: Sequence[str] | None,
    store_key: str | None,
    store_url: str | None,
    extra_json: Mapping[str, Any],
) -> dict[str, Path]:
    from pipeline.heads.metrics import confusion_matrix
    from pipeline.heads.predict import write_predictions_csv
    from pipeline.plots import plot_confusion, plot_learning_curves

    names = list(class_names) if class_names is not None else list(result.class_names)
    save_head(
        result.best_head(),
        out,
        class_names=names,
        spec=result.best_spec,
        store_key=store_key,
        store_url=store_url,
        extra={"val": result.val[result.best_index], "train_config": _config_dict(result)},
    )
    paths = {"head": out / WEIGHTS_FILE, "config": out / CONFIG_FILE}
    metrics = result.summary()
    if result.test_probs is not None and result.test_labels is not None:
        pred = result.test_probs.argmax(axis=1)
        cm = confusion_matrix(result.test_labels, pred, num_classes=len(names))
        metrics["test_confusion"] = cm.tolist()
        paths["predictions"] = write_predictions_csv(
            out / "predictions.csv",
            probs=result.test_probs,
            class_names=names,
            ids=ids if ids is not None else result.test_ids,
            labels=result.test_labels,
        )
        with atomic_file(out / "confusion.png") as tmp:
            plot_confusion(cm, tmp, class_names=names)
        paths["confusion"] = out / "confusion.png"
    paths["metrics"] = write_json(out / "metrics.json", metrics)
    with atomic_file(out / "learning_curves.png") as tmp:
        plot_learning_curves(
            result.curves, tmp, best_index=result.best_index, labels=[s.name for s in result.specs]
        )
    paths["learning_curves"] = out / "learning_curves.png"
    for name, obj in extra_json.items():
        paths[Path(name).stem] = write_json(out / name, obj)
    return paths


def write_fewshot_run(
    result: FewShotResult,
    out_dir: str | Path,
    *,
    class_names: Sequence[str],
    store_key: str | None = None,
    store_url: str | None = None,
    summary: Mapping[str, Any],
) -> Path:
    """Publish a few-shot run as a whole (`publish_run`): ``seed-<s>/`` with each seed's head
    (``head.safetensors``, ``config.json``), the head of the spec most seeds chose at the top
    (its first seed's; ``carrot predict --head DIR`` reads it), and ``summary.json``."""
    best = result.best_spec()
    first = next(r for r in result.runs if r.best_spec == best)

    def write(staging: Path) -> Path:
        for run in result.runs:
            extra = {"seed": run.seed, "shots": result.shots, "test": run.test, "refit": run.refit}
            save_head(
                run.head,
                staging / f"seed-{run.seed}",
                class_names=class_names,
                spec=run.best_spec,
                store_key=store_key,
                store_url=store_url,
                extra=extra,
            )
        save_head(
            first.head,
            staging,
            class_names=class_names,
            spec=best,
            store_key=store_key,
            store_url=store_url,
            extra={"seed": first.seed, "shots": result.shots, "test": first.test},
        )
        return write_json(staging / "summary.json", dict(summary))

    publish_run(out_dir, write)
    return Path(out_dir)


def _config_dict(result: TrainResult) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(result.config)
