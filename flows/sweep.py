"""Prefect flow ``sweep``: stage 1 and stage 2 for each backbone, then one comparison.

One task per backbone (``sweep-backbone``: embed or reuse the store, probe, k-NN, CARROT vs
plain); a failed backbone is a failed task and an error row, the others go on. With
``distributed`` the tasks are submitted to the flow's (Dask) task runner, one backbone per
worker at a time; each row is saved as it arrives. Artifacts: the comparison table, a markdown
summary and the bar chart.
"""

from __future__ import annotations

import base64
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from pipeline.evaluation.sweep import (
    SweepSpec,
    format_rows,
    run_backbone,
    run_in_turn,
    sweep,
)


@task(name="sweep-backbone", cache_policy=NO_CACHE)
def backbone_task(spec: SweepSpec, backbone: str) -> dict:
    return run_backbone(spec, backbone)


def _submit_all(spec: SweepSpec, backbones: list[str]):
    """`pipeline.evaluation.sweep.RunAll` over submitted tasks: (backbone, row or error) as each
    task finishes."""
    futures = {backbone_task.submit(spec, b): b for b in backbones}
    for future in as_completed(list(futures)):
        try:
            yield futures[future], future.result()
        except Exception as e:  # the failed backbone's row; the others go on
            yield futures[future], e


def _cell(v: object) -> object:
    return round(v, 4) if isinstance(v, float) else v


@flow(name="sweep", log_prints=False, validate_parameters=False)
def sweep_flow(spec: SweepSpec, out: str, distributed: bool = False) -> dict:
    """Compare ``spec.backbones`` on ``spec.data``; files under ``out``. Returns rows + files.

    ``distributed``: the backbones are submitted to the flow's task runner (Dask) at once."""
    run_all = _submit_all if distributed else run_in_turn(lambda s, b: backbone_task(s, b))
    result = sweep(spec, run_all=run_all, out=Path(out))
    table = [{k: _cell(r.get(k)) for k in result.fields} for r in result.rows]
    create_table_artifact(key="sweep-table", table=table, description=f"carrot sweep {spec.data}")
    text = "\n".join(format_rows(result.rows, spec.shots))
    create_markdown_artifact(
        key="sweep-summary",
        markdown=f"# Backbone sweep: {spec.data}\n\n```\n{text}\n```\n\nFiles: {result.out}\n",
    )
    png = Path(result.files["png"])
    create_image_artifact(
        image_url="data:image/png;base64," + base64.b64encode(png.read_bytes()).decode(),
        key="sweep-chart",
    )
    return {"rows": result.rows, "files": result.files, "out": str(result.out)}
