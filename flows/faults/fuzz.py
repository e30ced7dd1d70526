"""Fuzzing with hypothesis: CSV manifests through ``carrot embed``, and invalid option strings
through ``carrot embed``, ``carrot train`` and ``carrot predict`` — never a traceback, never an
exit code other than 0 or 2, never a partial store marked complete.

Both run in this process through `flows.cli.main` (`flows.faults.console.carrot`), ``examples``
hypothesis examples from ``seed`` (same seed, same examples), and return a dict of counts; every
count listed in ``FAILURES`` has target 0, and ``failures`` holds the first few failing cases.

- `fuzz_csv_manifests`: manifests drawn from real columns (``path,label[,split]``, any order
  and case), junk, missing and duplicate columns, or no header; rows naming existing 16×16 PNGs
  (odd names: spaces, unicode, a comma, a quote, a newline; a symlink; an unreadable file),
  missing files, paths leading out of the folder (relative and absolute, with and without
  ``--allow-outside-paths``), odd and empty labels, known, unknown and empty split names,
  duplicate rows, blank lines, short and long rows; written with or without quoting, CRLF, a
  BOM, as UTF-16, with a non-UTF-8 byte, a NUL, a cell over the csv field limit, cut short, or
  with zero rows. Each is embedded for real (``--backbone test_resnet``; a Prefect flow runs
  when the manifest is accepted). Judged: exit 0 or 2, no traceback, exit 2 → one stderr line,
  a failed run leaves no store marked complete, and an accepted manifest gives one complete
  store that `carrot store verify` passes, holding exactly the manifest's rows (file, label,
  split; an unreadable file skipped). Where the manifest's meaning is certain (every mutation
  but cutting bytes, doubling the BOM and unquoted commas), the verdict is predicted from
  `pipeline.embed.sources`'s documented rules: a bad manifest accepted is a failure
  (``accepted_bad``); a good one refused is counted (``refused_good``).
- `fuzz_cli_options`: command lines whose option names come from the argparse parser
  (`flows.cli.build_parser`), at least one option given a value that is invalid for sure for
  its type (`flows.cli_args`: ``0``/``-1`` where positive, ``nan``, ``inf``, ``1e999``,
  ``abc``, ``''``, ``²``, non-ASCII digits made negative or non-numeric, 5 000 characters…),
  its choices, or its meaning (paths that are missing or files, unknown devices, feature
  modes, cache points, augmentations, splits), mixed with valid options, in ``--opt value`` or
  ``--opt=value`` form, sometimes abbreviated. Run under `bad_inputs.no_flows` (reaching a
  Prefect flow is a failure: the input was checked too late). Judged: exit 2, one stderr line,
  no traceback, no flow; ``not_named`` counts error lines that name neither the option nor
  its value.

In-process runs share one Python process: once Prefect is imported its logging configuration
hides library warnings, so a warning printed before an error in a fresh ``carrot`` process is
not seen here.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.faults.console import carrot, environment

TRACEBACK = "Traceback (most recent call last)"
FAILURES = (
    "tracebacks",
    "bad_exit",
    "escaped",
    "not_one_line",
    "complete_when_failed",
    "wrong_store",
    "accepted_bad",
    "reached_flow",
)
"""Counts whose target is 0 (each function reports those that apply to it)."""
_KEEP = 20  # failing cases kept in ``failures``


# ------------------------------------------------------------------------------ shared
def _run_examples(strategy, examples: int, seed: int, body: Callable[[Any], None]) -> None:
    """``body(case)`` for ``examples`` cases drawn from ``strategy``, seeded (no shrinking, no
    database, no deadline: ``body`` records outcomes, it never fails)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded

    @seeded(seed)
    @settings(
        max_examples=examples,
        derandomize=False,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        report_multiple_bugs=False,
    )
    @given(strategy)
    def run(case) -> None:
        body(case)

    run()


def _call(argv: Sequence[str], home: Path) -> tuple[int | None, str, str]:
    """`carrot` in process; an exception escaping `flows.cli.main` gives code None."""
    try:
        return carrot(list(argv), CARROT_HOME=str(home))
    except (Exception, SystemExit) as e:  # main must catch everything itself
        return None, "", f"{type(e).__name__}: {e}"


class _Failures:
    """The first failing case of each kind (``signature``), up to ``_KEEP`` kinds, each with
    how many cases of its kind failed (``count``)."""

    def __init__(self) -> None:
        self.cases: dict[tuple, dict[str, Any]] = {}

    def add(self, signature: tuple, record: Callable[[], dict[str, Any]]) -> None:
        if signature in self.cases:
            self.cases[signature]["count"] += 1
        elif len(self.cases) < _KEEP:
            self.cases[signature] = {**record(), "count": 1}

    def list(self) -> list[dict[str, Any]]:
        return list(self.cases.values())


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _shorten(value: object, limit: int = 300) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _stores_under(root: Path) -> list[Path]:
    """Every store folder (``*.zarr`` holding a ``zarr.json``) below ``root``."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*.zarr") if p.is_dir() and (p / "zarr.json").is_file())


def _marked_complete(path: Path) -> bool:
    """The store's ``complete`` flag: through `stores.open_store` (``require_complete=False``),
    else straight from its ``zarr.json`` (a store too broken to open may still claim it)."""
    from stores import open_store

    try:
        return open_store(str(path), require_complete=False).complete
    except Exception:
        try:
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
        except Exception:
            return False
        return attrs.get("complete") is True


# ------------------------------------------------------------------------------ CSV manifests
IMAGES = "images"  # the folder the manifests are written to (paths are relative to it)
GOOD = (
    "a/0.png",
    "a/1.png",
    "a/with space.png",
    "b/0.png",
    "b/ünïcödé.png",
    "b/com,ma.png",
    'c/quo"te.png',
    "c/new\nline.png",
    "c/2.png",
)
LINK = "a/link.png"  # a symlink to b/0.png
BROKEN = "b/broken.png"  # text, not an image: skipped (recorded), or refused with --strict
MISSING = (
    "a/nope.png",
    "A/0.png",
    "a\\0.png",
    "nope",
    "a",
    ".",
    "a/0.PNG",
    "../nope.png",
    "a/" + "n" * 300 + ".png",  # a name longer than the file system allows
    "../" + "d" * 300 + "/x.png",
)
OUTSIDE = "../outside/x.png"  # an existing image outside the manifest's folder
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
GOOD_SPLITS = ("train", "val", "test", "TRAIN", " Test ", "valid", "Validation")
BAD_SPLITS = ("holdout", "tr ain", "dev", "0", "train,val")
CLEAN_LABELS = ("a", "b", "c")
ODD_LABELS = (
    "bird one",
    "ünïcödé",
    "x,y",
    'q"t',
    "multi\nline",
    "car\rriage",
    "  padded  ",
    "a\tb",
    "🐦",
    "\u202ertl",
    "=1+1",
)
EMPTY = ("", "   ")
JUNK_COLUMNS = ("notes", "id", "file", "class", "", "label2", "paths", "größe", "x,y")
ODD_NAMES = (
    "with space.csv",
    "ünïcödé.csv",
    "UPPER.CSV",
    "new\nline.csv",
    "a,b.csv",
    "-dash.csv",
    ".csv",
    "notes.csv.txt",
)
HUGE = 140_000  # characters: over the csv module's default field limit (131 072)
MUTATIONS = (
    "missing_file",
    "duplicate_row",
    "outside_row",
    "outside_allowed",
    "empty_label",
    "empty_path",
    "unknown_split",
    "partial_split",
    "drop_column",
    "junk_column",
    "dup_column",
    "header_case",
    "header_misnamed",
    "blank_lines",
    "short_row",
    "long_row",
    "odd_labels",
    "one_class",
    "respell",
    "link_row",
    "broken_row",
    "strict_broken",
    "strict",
    "zero_rows",
    "empty_file",
    "only_blank",
    "nul_in_path",
    "nul_in_label",
    "huge_cell",
    "bom",
    "double_bom",
    "utf16",
    "bad_byte",
    "crlf",
    "quote_all",
    "raw",
    "truncate",
    "odd_name",
)


@dataclass
class Manifest:
    """One drawn manifest: its rows as cells (header included), and how it is written."""

    lines: list[list[str]]
    name: str = "manifest.csv"
    header: bool = True
    encoding: str = "utf-8"  # "utf-8-sig" (a BOM) | "utf-16"
    terminator: str = "\n"
    quote_all: bool = False
    raw: bool = False  # cells joined by commas, never quoted
    double_bom: bool = False
    truncate: float | None = None  # keep this fraction of the bytes
    inject: tuple[float, bytes] | None = None  # a byte inserted at this fraction
    allow_outside: bool = False
    strict: bool = False
    tags: list[str] = field(default_factory=list)

    def data(self) -> bytes:
        def quoted(cell: str) -> str:  # RFC 4180 (Python's csv.writer leaves a lone \r bare)
            if self.raw or not (self.quote_all or _special(cell)):
                return cell
            return '"' + cell.replace('"', '""') + '"'

        text = "".join(",".join(map(quoted, row)) + self.terminator for row in self.lines)
        data = text.encode(self.encoding)
        if self.double_bom:
            data = b"\xef\xbb\xbf\xef\xbb\xbf" + data
        if self.truncate is not None:
            data = data[: int(len(data) * self.truncate)]
        if self.inject is not None:
            at = int(len(data) * self.inject[0])
            data = data[:at] + self.inject[1] + data[at:]
        return data

    @property
    def certain(self) -> bool:
        """Whether the bytes mean exactly ``lines`` (or are refused for sure)."""
        if self.inject is not None or self.encoding == "utf-16":
            return True
        if self.double_bom or self.truncate is not None:
            return False
        return not (self.raw and any(_special(c) for row in self.lines for c in row))


def _special(cell: str) -> bool:
    return any(ch in cell for ch in ',"\n\r')


@dataclass(frozen=True)
class Expect:
    """The predicted verdict: ``accept`` (None: not predicted), why not, and the rows an
    accepted manifest's store must hold: (real path, label, split or "", unreadable)."""

    accept: bool | None
    why: str = ""
    rows: tuple[tuple[str, str, str, bool], ...] = ()


def _respell(draw, st, images: Path, path: str) -> str:
    """Another spelling of manifest path ``path`` (relative to ``images``) naming the same file."""
    how = draw(
        st.sampled_from(("dot", "double_slash", "absolute", "out_and_in", "padded", "updown"))
    )
    return {
        "dot": "./" + path,
        "double_slash": path.replace("/", "//", 1),
        "absolute": str(images / path),
        "out_and_in": f"../{IMAGES}/{path}",
        "padded": f"  {path} ",
        "updown": "a/../" + path,
    }[how]


def _manifests(data: Path):
    """The hypothesis strategy of `Manifest` over the files `_csv_data` wrote under ``data``."""
    from hypothesis import strategies as st

    images = data / IMAGES
    outside = (str(images / OUTSIDE), OUTSIDE, str(data / "outside" / "x.png"))

    @st.composite
    def manifests(draw) -> Manifest:
        n = draw(st.integers(2, 6))
        files = draw(st.lists(st.sampled_from(GOOD), min_size=n, max_size=n, unique=True))
        use_split = draw(st.booleans())
        columns = ["path", "label"] + (["split"] if use_split else [])
        header = draw(st.sampled_from((True, True, True, False)))
        if header:
            columns = list(draw(st.permutations(columns)))
        rows = []
        for j, f in enumerate(files):  # the simplest draw labels the rows a, b, c, a…
            cell = {"path": f, "label": CLEAN_LABELS[(j + draw(st.integers(0, 2))) % 3]}
            if use_split:
                cell["split"] = draw(st.sampled_from(GOOD_SPLITS))
            rows.append(cell)
        m = Manifest(lines=[], header=header)
        mutations = draw(st.lists(st.sampled_from(("none", *MUTATIONS)), min_size=1, max_size=3))
        cols = list(columns)
        names = list(columns)  # header cells as written
        pending: list[Callable[[list[list[str]]], None]] = []  # run on the lines

        def new_row(path: str) -> dict[str, str]:
            row = {"path": path, "label": draw(st.sampled_from(CLEAN_LABELS))}
            if "split" in cols:
                row["split"] = draw(st.sampled_from(GOOD_SPLITS))
            return row

        for mut in mutations:
            m.tags.append(mut)
            if mut == "none":
                m.tags.pop()
            elif mut == "missing_file":
                rows.insert(
                    draw(st.integers(0, len(rows))), new_row(draw(st.sampled_from(MISSING)))
                )
            elif mut == "duplicate_row" and rows:
                copy = dict(draw(st.sampled_from(rows)))
                if draw(st.booleans()) and copy["path"] in GOOD:
                    copy["path"] = _respell(draw, st, images, copy["path"])
                if draw(st.booleans()):
                    copy["label"] = draw(st.sampled_from(CLEAN_LABELS))
                rows.insert(draw(st.integers(0, len(rows))), copy)
            elif mut in ("outside_row", "outside_allowed"):
                rows.append(new_row(draw(st.sampled_from(outside))))
                m.allow_outside = mut == "outside_allowed"
            elif mut in ("empty_label", "empty_path") and rows:
                row = draw(st.sampled_from(rows))
                row[mut.removeprefix("empty_")] = draw(st.sampled_from(EMPTY))
            elif mut in ("unknown_split", "partial_split") and rows and "split" in cols:
                bad = BAD_SPLITS if mut == "unknown_split" else EMPTY
                draw(st.sampled_from(rows))["split"] = draw(st.sampled_from(bad))
            elif mut == "drop_column" and len(cols) > 1:
                gone = draw(st.sampled_from([c for c in cols if c != "junk"] or cols))
                i = cols.index(gone)
                del cols[i], names[i]
            elif mut == "junk_column":
                i = draw(st.integers(0, len(cols))) if header else len(cols)
                cols.insert(i, "junk")
                names.insert(i, draw(st.sampled_from(JUNK_COLUMNS)))
                junk = st.text(st.sampled_from('ab ,"\n1é'), max_size=6)
                for row in rows:
                    row.setdefault("junk", draw(junk))
            elif mut == "dup_column" and header:
                twin = draw(st.sampled_from([c for c in cols if c in ("path", "label")] or cols))
                i = draw(st.integers(0, len(cols)))
                cols.insert(i, twin)
                names.insert(i, twin)
            elif mut == "header_case" and header:
                spell = st.sampled_from(("upper", "title", "padded"))
                names = [_case(nm, draw(spell)) for nm in names]
            elif mut == "header_misnamed" and header:
                rename = {"path": "file", "label": "class"}
                names = [rename.get(nm.strip().lower(), nm) for nm in names]
            elif mut == "blank_lines":
                blank = draw(st.sampled_from(([], [""], ["", ""], ["   ", ""], [" "] * 3)))
                at = draw(st.integers(0, len(rows) + 1))
                pending.append(lambda lines, blank=blank, at=at: lines.insert(at, list(blank)))
            elif mut in ("short_row", "long_row"):
                at = draw(st.integers(0, len(rows) + (1 if header else 0)))
                extra = draw(st.sampled_from(("", "x", "train")))

                def edit(lines, at=at, extra=extra, short=mut == "short_row"):
                    if at < len(lines):
                        if short and lines[at]:
                            lines[at].pop()
                        elif not short:
                            lines[at].append(extra)

                pending.append(edit)
            elif mut == "odd_labels":
                for row in rows:
                    if draw(st.booleans()):
                        row["label"] = draw(st.sampled_from(ODD_LABELS))
            elif mut == "one_class":
                label = draw(st.sampled_from(CLEAN_LABELS))
                for row in rows:
                    row["label"] = label
            elif mut == "respell":
                for row in rows:
                    if row["path"] in GOOD and draw(st.booleans()):
                        row["path"] = _respell(draw, st, images, row["path"])
            elif mut == "link_row":
                rows.append(new_row(LINK))
            elif mut in ("broken_row", "strict_broken"):  # skipped; --strict: refused in the flow
                rows.insert(draw(st.integers(0, len(rows))), new_row(BROKEN))
                m.strict = m.strict or mut == "strict_broken"
            elif mut == "strict":
                m.strict = True
            elif mut == "zero_rows":
                rows.clear()
            elif mut == "empty_file":
                pending.append(lambda lines: lines.clear())
            elif mut == "only_blank":
                pending.append(lambda lines: lines.__setitem__(slice(None), [[""], [" ", " "]]))
            elif mut == "nul_in_path":  # a new row: a NUL in a path of any kind
                pool = (*outside, _respell(draw, st, images, files[0]), files[0], LINK, *MISSING)
                rows.append(new_row(draw(st.sampled_from(pool))))
                cell = rows[-1]["path"]  # the NUL starts or ends a component, or anywhere
                ends = [i + 1 for i, ch in enumerate(cell) if ch == "/"]
                ends += [i for i, ch in enumerate(cell) if ch == "/"] + [0, len(cell)]
                at = draw(st.sampled_from(ends) | st.integers(0, len(cell)))
                rows[-1]["path"] = cell[:at] + "\x00" + cell[at:]
            elif mut == "nul_in_label" and rows:
                row = draw(st.sampled_from(rows))
                at = draw(st.integers(0, len(row["label"])))
                row["label"] = row["label"][:at] + "\x00" + row["label"][at:]
            elif mut == "huge_cell" and rows:
                draw(st.sampled_from(rows))["label"] = "h" * HUGE
            elif mut == "bom":
                m.encoding = "utf-8-sig"
            elif mut == "double_bom":
                m.double_bom = True
            elif mut == "utf16":
                m.encoding = "utf-16"
            elif mut == "bad_byte":
                m.inject = (
                    draw(st.floats(0, 1)),
                    draw(st.sampled_from((b"\xff", b"\xe9", b"\x80"))),
                )
            elif mut == "crlf":
                m.terminator = "\r\n"
            elif mut == "quote_all":
                m.quote_all = True
            elif mut == "raw":
                m.raw = True
            elif mut == "truncate":
                m.truncate = draw(st.floats(0.05, 0.98))
            elif mut == "odd_name":
                m.name = draw(st.sampled_from(ODD_NAMES))
            else:
                m.tags.pop()  # did not apply
        lines = [list(names)] if header else []
        lines += [[row.get(c, "") for c in cols] for row in rows]
        for edit in pending:
            edit(lines)
        m.lines = lines
        return m

    return manifests()


def _case(name: str, how: str) -> str:
    return {"upper": name.upper(), "title": name.title(), "padded": f" {name}  "}[how]


def _expect(m: Manifest, images: Path) -> Expect:
    """What `pipeline.embed.sources` must make of ``m`` (its module doc and error messages are
    the rules): refused, accepted with these rows, or not predicted."""
    if not m.certain:
        return Expect(None, "uncertain bytes")
    if m.inject is not None or m.encoding == "utf-16":
        return Expect(False, "not UTF-8")
    if Path(m.name).suffix.lower() != ".csv":
        return Expect(False, "not a .csv name")
    limit = csv.field_size_limit()
    rows = [r for r in m.lines if any(c.strip() for c in r)]
    if any(len(c) > limit for r in m.lines for c in r):
        return Expect(False, "a cell over the csv field limit")
    if not rows:
        return Expect(False, "no rows")
    first = [c.strip().lower() for c in rows[0]]
    if "path" in first or "label" in first:
        if "path" not in first or "label" not in first:
            return Expect(False, "header lacks path or label")
        cols = {c: first.index(c) for c in ("path", "label", "split") if c in first}
        rows = rows[1:]
    else:
        if len(rows[0]) not in (2, 3):
            return Expect(False, "first row not 2 or 3 cells")
        cols = dict(zip(("path", "label", "split"), range(len(rows[0])), strict=False))
    width = max(cols.values()) + 1
    entries = []
    for r in rows:
        if len(r) < width:
            return Expect(False, "short row")
        p, label = r[cols["path"]].strip(), r[cols["label"]].strip()
        split = r[cols["split"]].strip().lower() if "split" in cols else ""
        if not p or not label:
            return Expect(False, "empty path or label")
        if split and split not in SPLIT_ALIASES:
            return Expect(False, "unknown split")
        entries.append((p, label, SPLIT_ALIASES.get(split, "")))
    if not entries:
        return Expect(False, "header only")
    base = str(images)
    fulls = []
    for p, _, _ in entries:
        full = os.path.normpath(os.path.join(base, p))
        if os.path.commonpath([base, full]) != base and not m.allow_outside:
            return Expect(False, "outside the folder")
        fulls.append(full)
    if not all(os.path.isfile(f) for f in fulls):
        return Expect(False, "missing file")
    reals = [os.path.realpath(f) for f in fulls]
    if len(set(reals)) < len(reals):
        return Expect(False, "one file on two rows")
    splits = [s for _, _, s in entries]
    if any(splits) and not all(splits):
        return Expect(False, "split given for some rows only")
    if len({label for _, label, _ in entries}) < 2:
        return Expect(False, "one class")
    broken = [os.path.basename(f) == os.path.basename(BROKEN) for f in fulls]
    if m.strict and any(broken):
        return Expect(False, "unreadable image with --strict")
    return Expect(
        True,
        rows=tuple(
            (real, label, split, bad)
            for real, (_, label, split), bad in zip(reals, entries, broken, strict=True)
        ),
    )


def _csv_data(data: Path) -> Path:
    """The images the manifests name (16×16 PNGs), written once under ``data``."""
    import numpy as np
    from PIL import Image

    images = data / IMAGES
    for i, rel in enumerate((*GOOD, "../outside/x.png")):
        path = images / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, format="PNG")
    (images / BROKEN).write_text("not an image\n")
    link = images / LINK
    if not link.is_symlink():
        os.symlink("../b/0.png", link)
    return data


def _check_store(store: Path, expect: Expect, images: Path, home: Path) -> str:
    """Why the store of an accepted manifest is wrong ("" when it is right)."""
    from stores import open_store

    try:
        s = open_store(str(store))
    except Exception as e:
        return f"the store does not open complete: {type(e).__name__}: {e}"
    code, out, _ = _call(["store", "verify", str(store)], home)
    if code != 0:
        return f"carrot store verify exits {code}: {out.strip()[:300]}"
    id_root = s.identity.extra.get("id_root") or str(images)
    ids = s.ids(valid_only=False)
    labels = s.labels(valid_only=False)
    splits = s.split_array()
    valid = s.valid_mask()
    got = {
        os.path.realpath(os.path.join(id_root, i)): (s.class_names[lab], str(sp), bool(v))
        for i, lab, sp, v in zip(ids, labels, splits, valid, strict=True)
    }
    if len(got) != s.n:
        return f"{s.n} rows but {len(got)} distinct files"
    if expect.accept is None:  # what the rows are is not known: they must be real files
        strays = [r for r in got if not os.path.isfile(r)]
        return f"rows naming no file: {strays[:3]}" if strays else ""
    if s.n != len(expect.rows):
        return f"{s.n} rows, the manifest has {len(expect.rows)}"
    if s.class_names != sorted({label for _, label, _, _ in expect.rows}):
        return f"class names {s.class_names}"
    given = {split for _, _, split, _ in expect.rows}
    carved = {"train"} | ({"val", "test"} - given)  # splits not given are carved from train
    for real, label, split, broken in expect.rows:
        if real not in got:
            return f"{real!r} is not in the store"
        name, stored_split, ok = got[real]
        allowed = carved if split == "train" else {split}
        if name != label or (split and stored_split not in allowed) or ok == broken:
            want = (label, split, not broken)
            return f"{real!r} stored as {(name, stored_split, ok)}, expected {want}"
    return ""


def fuzz_csv_manifests(root: Path, *, examples: int = 100, seed: int = 0) -> dict[str, Any]:
    """``examples`` drawn manifests through ``carrot embed`` under ``root`` (see the module).

    Counts: ``examples``; ``accepted`` (exit 0), ``refused`` (exit 2); ``predicted`` (examples
    whose verdict `_expect` predicts), ``refused_good`` (predicted accepted, refused: not a
    failure by itself, see ``failures``); the failures ``tracebacks``, ``bad_exit`` (exit code
    not 0 or 2), ``escaped`` (an exception out of `flows.cli.main`), ``not_one_line`` (exit 2
    without exactly one stderr line), ``complete_when_failed`` (exit ≠ 0 and a store marked
    complete), ``wrong_store`` (exit 0 without one complete, verified store holding the
    manifest's rows), ``accepted_bad`` (predicted refused, exit 0); ``mutations`` (how often
    each was drawn), ``reasons`` (the predicted reasons of refusal), ``seconds``, ``failures``.
    """
    from flows.faults.kills import shared_api_url

    t0 = time.perf_counter()
    root = Path(root)
    data = _csv_data(root / "data")
    images = data / IMAGES
    home = root / "home"
    counts: Counter[str] = Counter()
    for name in ("accepted", "refused", "predicted", "refused_good", *FAILURES[:-1]):
        counts[name] = 0
    mutations: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    failures = _Failures()

    def one(m: Manifest) -> None:
        i = counts["examples"]
        counts["examples"] += 1
        mutations.update(m.tags or ["none"])
        expect = _expect(m, images)
        if expect.accept is not None:
            counts["predicted"] += 1
        if expect.accept is False:
            reasons[expect.why] += 1
        path = images / m.name
        out = root / "stores" / f"{i:04d}"
        argv = ["embed", str(path), "--backbone", "test_resnet", "--image-size", "16"]
        argv += ["--workers", "0", "--batch-size", "8", "--root", str(out)]
        argv += ["--allow-outside-paths"] * m.allow_outside + ["--strict"] * m.strict
        path.write_bytes(m.data())
        try:
            code, stdout, stderr = _call(argv, home)
            found = _stores_under(out)
            wrong: list[str] = []
            if code is None:
                wrong.append("escaped")
            elif code not in (0, 2):
                wrong.append("bad_exit")
            if TRACEBACK in stderr or TRACEBACK in stdout:
                wrong.append("tracebacks")
            if code == 2 and len(_lines(stderr)) != 1:
                wrong.append("not_one_line")
            if code != 0 and any(_marked_complete(s) for s in found):
                wrong.append("complete_when_failed")
            why = ""
            if code == 0:
                counts["accepted"] += 1
                if len(found) != 1:
                    why = f"{len(found)} stores written"
                else:
                    why = _check_store(found[0], expect, images, home)
                if why:
                    wrong.append("wrong_store")
                if expect.accept is False:
                    wrong.append("accepted_bad")
                    why = why or f"accepted, but {expect.why}"
            elif code == 2:
                counts["refused"] += 1
                if expect.accept is True:
                    counts["refused_good"] += 1
            for w in wrong:
                counts[w] += 1
            if wrong or (code == 2 and expect.accept is True):
                kinds = wrong or ["refused_good"]
                failures.add(
                    (*kinds, expect.why, *sorted(m.tags)),
                    lambda: {
                        "kinds": kinds,
                        "mutations": m.tags,
                        "manifest": _shorten(m.data(), 600),
                        "name": m.name,
                        "options": argv[argv.index("--root") + 2 :],
                        "code": code,
                        "stderr": _shorten(stderr, 600),
                        "expected": expect.why or ("accept" if expect.accept else "?"),
                        "detail": why,
                    },
                )
        finally:
            path.unlink(missing_ok=True)
            shutil.rmtree(out, ignore_errors=True)

    with environment(PREFECT_API_URL=shared_api_url(), CARROT_HOME=str(home)):
        _run_examples(_manifests(data), examples, seed, one)
    result: dict[str, Any] = dict(counts)
    result["mutations"] = dict(sorted(mutations.items()))
    result["reasons"] = dict(sorted(reasons.items()))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["failures"] = failures.list()
    return result


# ------------------------------------------------------------------------------ CLI options
COMMANDS = ("embed", "train", "predict")

# Values invalid for sure for each value type of `flows.cli_args` (by the function's name).
_NOT_INT = (
    "nan",
    "inf",
    "-inf",
    "1e999",
    "1e3",
    "1.5",
    "2.0",
    "abc",
    "",
    " ",
    "1_000x",
    "0x10",
    "٣x",
    "²",
    "1/2",
    "9" * 5000,  # over Python's 4300-digit limit of int()
    "x" * 5000,
    "1,2",
    "true",
    "١.٥",
)
_NEGATIVE = ("-1", "-7", "-٣", "-１", "-0x1")
_NOT_POSITIVE = ("0", "+0", "0000", " 0 ", "-0", "٠", "０")
_NOT_FINITE = ("nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e999", "-1e999")
_NOT_FLOAT = ("abc", "", " ", "1,5", "0x1p3", "1e", "e5", "--1", "1..2", "²", "x" * 5000, "1_0x")
TYPE_INVALID: dict[str, tuple[str, ...]] = {
    "positive_int": _NOT_INT + _NEGATIVE + _NOT_POSITIVE,
    "nonneg_int": _NOT_INT + _NEGATIVE,
    "positive_float": _NOT_FINITE + _NOT_FLOAT + ("-1", "-1e-300", "0", "0.0", "-0", "٠"),
    "nonneg_float": _NOT_FINITE + _NOT_FLOAT + ("-1", "-1e-300", "-0.5", "-٣"),
    "fraction": ("0", "1", "1.0", "-0.5", "1.5", "2", "nan", "inf", "-inf", "1e999", "abc", ""),
    "positive_floats": (
        "0",
        "1e-3,0",
        "1e-3,nan",
        "inf",
        ",",
        "",
        " , ",
        "1e-3;1e-2",
        "abc",
        "1e-3,-1",
        "1e999",
        "0.01,x",
        "-0",
    ),
    "nonneg_floats": ("-1", "0,-1", "nan", "1,inf", ",", "", "abc", "1e999", "0;1", "-1e-9"),
    "threads_or_auto": ("0", "-1", "nan", "autox", "", "1.5", "auto,1", "two", "٠", "-٣"),
    "positive_ints": ("0", "1,1", "1,-2", "", ",", "1.5", "a,b"),
    "_dask_address": ("nonsense", "", "tcp://", "http://host:1", "tcp:/host:1", "tcp://:1"),
}
_FLAG_INVALID = ("1", "yes", "", "false")  # given as --flag=VALUE


@dataclass(frozen=True)
class Paths:
    """What `prepare_cli` writes: the data, store and head the valid options point at."""

    root: Path
    good: Path  # an image folder, classes a and b
    store: str  # its store (carrot embed)
    head: Path  # a head over that store
    a_file: Path
    a_dir: Path  # an empty folder


def _string_invalid(command: str, dest: str, p: Paths) -> tuple[str, ...]:
    """Invalid values of the options without a value type, by what they mean."""
    r = p.root
    missing = (str(r / "nope"), str(r / "new\nline"), str(r / "ünï" / "x"), str(r / "spa ce"))
    table: dict[tuple[str, str], tuple[str, ...]] = {
        ("embed", "data"): (*missing, str(p.a_file), str(p.a_dir)),
        ("embed", "backbone"): ("nope_net", "", "resnet18\n", "tëst_resnet", "../test_resnet"),
        ("embed", "checkpoint"): (
            *(m + ".pth" for m in missing),
            str(p.good),
            str(p.a_file),
            str(p.good / "a" / "0.png"),
        ),
        ("embed", "device"): ("gpu", "cuda:x", "mps", "cuda:99", "tpu", "cuda:-1", "cpu:x", "κpu"),
        ("embed", "features"): (
            "nope",
            "last:0",
            "last:-1",
            "last:x",
            "last:²",
            "last:",
            "LAST:2",
            "",
            "pooled\n",
            "last:2",
        ),
        ("embed", "cache_at"): (
            "block:1",
            "block:0",
            "block:-0",
            "block:-x",
            "block:-²",
            "blk:-1",
            "block:-1.5",
            "block:--1",
            "block:-999",
            "-1",
            "BLOCK:-1",
            "block:- 1",
        ),
        ("embed", "root"): (str(p.a_file), str(p.a_file / "sub")),
        ("train", "store"): (*missing, str(p.a_file), str(p.a_dir), str(p.good)),
        ("train", "aug"): ("nope", "none,nope", ",", "", "carrot;none", "NONE", "nonex"),
        ("train", "device"): ("gpu", "cuda:x", "mps", "cuda:99", "tpu", "cuda:-1", "cpu:x"),
        ("train", "checkpoint"): (str(p.good / "a" / "0.png"), *missing),
        ("train", "out"): (str(p.a_file), str(p.a_file / "sub")),
        ("predict", "store"): (*missing, str(p.a_file), str(p.a_dir), str(p.good)),
        ("predict", "head"): (*missing, str(p.a_file), str(p.a_dir), str(p.good), ""),
        ("predict", "split"): ("holdout", "TRAIN", "", "train\n", "validation", "all"),
        ("predict", "out"): (str(p.a_dir), str(r / "nope" / "x.csv"), str(p.a_file / "x.csv")),
    }
    return table.get((command, dest), ())


def _extra_invalid(command: str, dest: str) -> tuple[str, ...]:
    """Values the type accepts that the option's meaning refuses, for sure."""
    return {
        ("train", "delta"): ("0.5", "0.7", "0.99"),  # CARROT's delta is in (0, 0.5)
        ("train", "shots"): ("1000", "99999"),  # above the smallest class
        ("train", "trainable_blocks"): ("1", "2", "3"),  # the store holds pooled features
    }.get((command, dest), ())


def _valid(command: str, dest: str, p: Paths) -> tuple[str, ...]:
    """Values valid for the option on its own and together with every other valid value."""
    runs = str(p.root / "runs" / "fresh")
    table: dict[tuple[str, str], tuple[str, ...]] = {
        ("embed", "batch_size"): ("4", "8"),
        ("embed", "image_size"): ("16",),
        ("embed", "views"): ("0", "1"),
        ("embed", "dtype"): ("float32", "float16"),
        ("embed", "workers"): ("0",),
        ("embed", "chunk_rows"): ("8", "64"),
        ("embed", "val_fraction"): ("0.2",),
        ("embed", "test_fraction"): ("0.3",),
        ("embed", "seed"): ("0", "5"),
        ("embed", "fingerprint"): ("content", "stat"),
        ("embed", "device"): ("cpu", "auto"),
        ("embed", "features"): ("pooled",),
        ("embed", "strict"): ("",),
        ("embed", "json"): ("",),
        ("embed", "allow_outside_paths"): ("",),
        ("train", "epochs"): ("2", "100"),
        ("train", "batch_size"): ("16",),
        ("train", "optimizer"): ("sgd", "adam"),
        ("train", "lrs"): ("0.01", "1e-3,1e-2"),
        ("train", "wds"): ("0", "0,1e-3"),
        ("train", "label_smoothing"): ("0.1",),
        ("train", "min_steps"): ("0", "10"),
        ("train", "seed"): ("3",),
        ("train", "device"): ("cpu", "auto"),
        ("train", "threads"): ("1", "auto"),
        ("train", "shots"): ("1",),
        ("train", "seeds"): ("2",),
        ("train", "baseline"): ("",),
        ("train", "mode"): ("class", "sample"),
        ("train", "topk"): ("3",),
        ("train", "delta"): ("0.1",),
        ("train", "gamma"): ("0.5", "0"),
        ("train", "noise"): ("class_cov",),
        ("train", "injection"): ("pre_ln",),
        ("train", "aug_weight"): ("0.5",),
        ("train", "alpha_max"): ("2",),
        ("train", "aug_warmup_epochs"): ("1",),
        ("train", "aug"): ("none", "none,gaussian"),
        ("train", "out"): (runs,),
        ("train", "json"): ("",),
        ("predict", "split"): ("train", "test"),
        ("predict", "out"): (str(p.root / "runs" / "p.csv"),),
        ("predict", "allow_other_classes"): ("",),
        ("predict", "json"): ("",),
    }
    return table.get((command, dest), ())


# Options given together that are refused together (each value valid alone).
_COMBOS: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "embed": (
        (("--val-fraction", "0.6"), ("--test-fraction", "0.5")),
        (("--dask-address", "tcp://a:1"), ("--dask-workers", "2")),
        (("--pretrained", ""), ("--checkpoint", "x.pth")),
    ),
    "train": ((("--trainable-blocks", "1"), ("--aug", "none,carrot")),),
    "predict": (),
}
_UNKNOWN = ("--nope", "--batch-sizes", "--Json", "-x", "---json", "--json-")


@dataclass(frozen=True)
class OptionSpec:
    """One option (or positional) of a command: how it is given, and what to give it."""

    flag: str  # the longest option string; "" for a positional
    dest: str
    kind: str  # the value type's name, "choice", "flag", "string", "positional"
    invalid: tuple[str, ...]
    valid: tuple[str, ...]
    prefix: int = 0  # shortest unambiguous abbreviation's length (0: none)


def _subparser(command: str) -> argparse.ArgumentParser:
    from flows.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def option_specs(command: str, paths: Paths) -> tuple[list[OptionSpec], list[str]]:
    """The options of ``carrot COMMAND`` from its parser, with invalid and valid values; and
    the options it cannot fuzz (no invalid value known: a new option needs a table entry)."""
    parser = _subparser(command)
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    every = [s for a in actions for s in a.option_strings]
    specs, unknown = [], []
    for a in actions:
        flag = max(a.option_strings, key=len) if a.option_strings else ""
        kind_name = getattr(a.type, "__name__", "") if a.type is not None else ""
        if not a.option_strings:
            kind = "positional"
            invalid = _string_invalid(command, a.dest, paths)
        elif a.nargs == 0:
            kind, invalid = "flag", _FLAG_INVALID
        elif a.choices is not None:
            kind = "choice"
            first = str(next(iter(a.choices)))
            invalid = tuple(
                v
                for v in ("nope", first.upper(), first + " ", "", first[:-1])
                if v not in a.choices
            )
        elif kind_name in TYPE_INVALID:
            kind, invalid = kind_name, TYPE_INVALID[kind_name]
        elif a.type is None:
            kind, invalid = "string", _string_invalid(command, a.dest, paths)
        else:
            kind, invalid = kind_name or repr(a.type), ()
        invalid += _extra_invalid(command, a.dest)
        if not invalid:
            unknown.append(flag or a.dest)
        prefix = 0
        if flag.startswith("--"):
            for n in range(3, len(flag)):
                if sum(s.startswith(flag[:n]) for s in every) == 1:
                    prefix = n
                    break
        specs.append(
            OptionSpec(flag, a.dest, kind, invalid, _valid(command, a.dest, paths), prefix)
        )
    return specs, unknown


@dataclass(frozen=True)
class CommandLine:
    """A drawn command line and what makes it invalid."""

    command: str
    argv: tuple[str, ...]
    bad: tuple[tuple[str, str], ...]  # (option or dest, value) given invalid values
    kinds: tuple[str, ...]


def _base(command: str, p: Paths) -> dict[str, tuple[str, ...]]:
    """The arguments every command line of ``command`` has, by dest (replaced when drawn)."""
    fresh = str(p.root / "out")
    return {
        "embed": {
            "data": (str(p.good),),
            "backbone": ("--backbone", "test_resnet"),
            "root": ("--root", fresh),
        },
        "train": {"store": (p.store,)},
        "predict": {"store": (p.store,), "head": ("--head", str(p.head))},
    }[command]


def _command_lines(p: Paths, command: str):
    """The hypothesis strategy of `CommandLine` for ``carrot COMMAND``."""
    from hypothesis import strategies as st

    all_specs = option_specs(command, p)[0]
    junk = st.text(st.sampled_from("0123456789.-+e_ ,٣x"), max_size=8).map(lambda s: s + "x")

    @st.composite
    def lines(draw) -> CommandLine:
        groups: dict[str, tuple[str, ...]] = dict(_base(command, p))
        bad: list[tuple[str, str]] = []
        kinds: list[str] = []

        def given(spec: OptionSpec, value: str, *, invalid: bool) -> tuple[str, ...]:
            if not spec.flag:
                return (value,)
            flag = spec.flag
            if spec.prefix and draw(st.booleans()):
                flag = flag[: draw(st.integers(spec.prefix, len(flag)))]
            if spec.kind == "flag":
                return (f"{flag}={value}",) if invalid else (flag,)
            if draw(st.booleans()):
                return (f"{flag}={value}",)
            return (flag, value)

        how = draw(st.sampled_from(("options",) * 8 + ("combo", "unknown")))
        if how == "combo" and _COMBOS[command]:
            combo = draw(st.sampled_from(_COMBOS[command]))
            for flag, value in combo:
                spec = next(s for s in all_specs if s.flag == flag)
                groups[spec.dest] = (flag,) if spec.kind == "flag" else (flag, value)
                bad.append((flag, value))
            kinds.append("combo")
        elif how == "unknown":
            token = draw(st.sampled_from(_UNKNOWN))
            groups["?"] = (token,)
            bad.append((token, ""))
            kinds.append("unknown option")
        else:
            chosen = draw(
                st.lists(
                    st.sampled_from([s for s in all_specs if s.invalid]),
                    min_size=1,
                    max_size=2,
                    unique_by=lambda s: s.dest,
                )
            )
            for spec in chosen:
                numeric = spec.kind in TYPE_INVALID and spec.kind != "_dask_address"
                pool = st.sampled_from(spec.invalid)
                value = draw(st.one_of(pool, junk) if numeric else pool)
                groups[spec.dest] = given(spec, value, invalid=True)
                bad.append((spec.flag or spec.dest.upper(), value))
                kinds.append(spec.kind)
        fixed = set(groups)
        extra = draw(
            st.lists(
                st.sampled_from([s for s in all_specs if s.valid and s.dest not in fixed]),
                max_size=4,
                unique_by=lambda s: s.dest,
            )
        )
        for spec in extra:
            groups[spec.dest] = given(spec, draw(st.sampled_from(spec.valid)), invalid=False)
        order = draw(st.permutations(list(groups)))
        argv = [command] + [word for dest in order for word in groups[dest]]
        return CommandLine(command, tuple(argv), tuple(bad), tuple(kinds))

    return lines()


def prepare_cli(root: Path) -> Paths:
    """An image folder (classes a and b, 10 16×16 PNGs each: enough that splitting them warns
    of nothing), its store (``carrot embed``: a Prefect flow runs), a head over the store."""
    import numpy as np
    from PIL import Image

    from flows.faults.kills import shared_api_url
    from pipeline.heads.bank import Head
    from pipeline.heads.io import save_head
    from stores import open_store

    root = Path(root)
    good = root / "good"
    for c, cls in enumerate("ab"):
        (good / cls).mkdir(parents=True, exist_ok=True)
        for i in range(10):
            pixels = np.random.default_rng(100 * c + i).integers(0, 256, (16, 16, 3), np.uint8)
            Image.fromarray(pixels).save(good / cls / f"{i}.png")
    (root / "a-file").write_text("a file, not a folder\n")
    (root / "a-dir").mkdir(exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)  # where the valid --out values go
    argv = ["embed", str(good), "--backbone", "test_resnet", "--image-size", "16"]
    argv += ["--workers", "0", "--root", str(root / "stores"), "--json"]
    with environment(PREFECT_API_URL=shared_api_url()):
        code, out, err = carrot(argv, CARROT_HOME=str(root / "home"))
    if code != 0:
        raise RuntimeError(f"carrot embed of the good folder failed ({code}): {err[-500:]}")
    url = json.loads(out)["store"]
    store = open_store(url)
    head = Head(store.dim, len(store.class_names))
    save_head(
        head, root / "head", class_names=store.class_names, store_url=url, store_key=store.key
    )
    return Paths(root, good, url, root / "head", root / "a-file", root / "a-dir")


def _named(line: str, bad: Sequence[tuple[str, str]]) -> bool:
    """Whether the error line names one of the invalid options or values."""
    from pipeline.terminal import printable

    for flag, value in bad:
        if flag and flag in line:
            return True
        shown = printable(value).strip()
        if shown and shown[:60] in line:
            return True
    return False


def fuzz_cli_options(
    root: Path, *, examples: int = 200, seed: int = 0, paths: Paths | None = None
) -> dict[str, Any]:
    """``examples`` drawn command lines of ``carrot embed|train|predict`` with invalid option
    values (see the module), under `bad_inputs.no_flows`; ``paths``: `prepare_cli`'s (made
    under ``root`` when not given; that runs one ``carrot embed`` flow).

    Counts: ``examples``, ``refused_right`` (exit 2, one line, no traceback, no flow); the
    failures ``bad_exit`` (exit code not 2; ``exit_0`` of them), ``escaped`` (an exception out
    of `flows.cli.main`), ``reached_flow``, ``tracebacks``, ``not_one_line``; ``not_named``
    (the line names neither the option nor its value; not a failure by itself);
    ``by_command``, ``by_kind`` (examples per kind of invalid value), ``options`` (how many
    options of each command were given an invalid value at least once, of how many),
    ``unfuzzed`` (options without invalid values), ``seconds``, ``failures``.
    """
    from flows.faults.bad_inputs import no_flows

    t0 = time.perf_counter()
    root = Path(root)
    p = paths or prepare_cli(root)
    home = root / "home"
    counts: Counter[str] = Counter()
    for name in ("refused_right", "exit_0", "not_named", "bad_exit", "escaped"):
        counts[name] = 0
    for name in ("reached_flow", "tracebacks", "not_one_line"):
        counts[name] = 0
    by_command: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    touched: dict[str, set[str]] = {c: set() for c in COMMANDS}
    failures = _Failures()

    def one(line: CommandLine) -> None:
        counts["examples"] += 1
        by_command[line.command] += 1
        by_kind.update(line.kinds)
        touched[line.command].update(flag for flag, _ in line.bad)
        shutil.rmtree(p.root / "out", ignore_errors=True)
        with no_flows():
            code, stdout, stderr = _call(line.argv, home)
        lines = _lines(stderr)
        wrong = []
        if code is None:
            wrong.append("escaped")
        elif code != 2:
            wrong.append("bad_exit")
            counts["exit_0"] += code == 0
        if "ReachedFlow" in stderr:
            wrong.append("reached_flow")
        if TRACEBACK in stderr or TRACEBACK in stdout:
            wrong.append("tracebacks")
        if len(lines) != 1:
            wrong.append("not_one_line")
        for w in wrong:
            counts[w] += 1
        named = bool(lines) and _named(lines[-1], line.bad)
        counts["not_named"] += code == 2 and not named
        if not wrong:
            counts["refused_right"] += 1
        if wrong or (code == 2 and not named):
            kinds = wrong or ["not_named"]
            failures.add(
                (*kinds, line.command, *sorted(f for f, _ in line.bad)),
                lambda: {
                    "kinds": kinds,
                    "argv": [_shorten(a, 120) for a in line.argv],
                    "invalid": [(f, _shorten(v, 80)) for f, v in line.bad],
                    "code": code,
                    "stderr": _shorten(stderr, 600),
                },
            )

    for k, command in enumerate(COMMANDS):  # an equal share each
        share = examples // len(COMMANDS) + (k < examples % len(COMMANDS))
        if share:
            _run_examples(_command_lines(p, command), share, seed, one)
    result: dict[str, Any] = dict(counts)
    result["by_command"] = dict(sorted(by_command.items()))
    result["by_kind"] = dict(sorted(by_kind.items()))
    options, unfuzzed = {}, []
    for c in COMMANDS:
        specs, missing = option_specs(c, p)
        flags = {s.flag or s.dest.upper() for s in specs if s.invalid}
        options[c] = f"{len(touched[c] & flags)}/{len(flags)}"
        unfuzzed += [f"{c} {m}" for m in missing]
    result["options"] = options
    result["unfuzzed"] = unfuzzed
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["failures"] = failures.list()
    return result


def failure_counts(result: dict[str, Any]) -> dict[str, int]:
    """The counts of ``result`` whose target is 0 (see ``FAILURES``)."""
    return {k: v for k, v in result.items() if k in FAILURES}


__all__ = [
    "FAILURES",
    "Expect",
    "Manifest",
    "OptionSpec",
    "Paths",
    "failure_counts",
    "fuzz_cli_options",
    "fuzz_csv_manifests",
    "option_specs",
    "prepare_cli",
]
