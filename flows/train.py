"""Prefect flows ``train_head`` and ``predict``: stage 2 over a store, as a recipe of tasks."""

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

from pipeline.heads.features import FeatureSet
from pipeline.heads.io import write_fewshot_run, write_outputs
from pipeline.heads.predict import open_predictor, predict, write_predictions_csv
from pipeline.heads.probe import ProbeReport, ProbeSettings, run_probe, settings_dict
from stores import EmbeddingStore, open_store


@task(name="load-features", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def load_features_task(store_url: str, device: str) -> tuple[EmbeddingStore, FeatureSet]:
    store = open_store(store_url)
    return store, FeatureSet.from_store(store, device=device)


@task(name="train-head-bank", cache_policy=NO_CACHE)
def train_task(features: FeatureSet, settings: ProbeSettings) -> ProbeReport:
    return run_probe(features, settings)


@task(name="write-outputs", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def write_outputs_task(
    report: ProbeReport, store: EmbeddingStore, out: str, settings: ProbeSettings
) -> dict[str, str]:
    """Replace the run folder ``out`` as a whole (head, metrics, plots, summary.json)."""
    summary = {**report.summary, "out": str(out), "store": store.url}
    summary["settings"] = settings_dict(settings)
    if report.fewshot is not None:  # few-shot: one head per seed, the most chosen on top
        write_fewshot_run(
            report.fewshot,
            out,
            class_names=store.class_names,
            store_key=store.key,
            store_url=store.url,
            summary=summary,
        )
        return {"summary": str(Path(out) / "summary.json"), "head": str(Path(out))}
    written = write_outputs(
        report.result,
        out,
        class_names=store.class_names,
        store_key=store.key,
        store_url=store.url,
        extra_json={"summary.json": summary},
    )
    return {k: str(v) for k, v in written.items()}


def png_data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


@flow(name="train-head", log_prints=False, validate_parameters=False)
def train_head_flow(store_url: str, settings: ProbeSettings, out: str) -> dict:
    """Stage 2: train the head grid over ``store_url``; write outputs to ``out``; summary dict."""
    store, features = load_features_task(store_url, settings.train.device)
    report = train_task(features, settings)
    paths = write_outputs_task(report, store, out, settings)
    s = report.summary
    rows = [{"metric": k, "value": s[k]} for k in ("top1", "top5", "mean_per_class") if s.get(k)]
    if "baseline" in s:
        rows.append({"metric": "baseline top1 (logreg)", "value": s["baseline"].get("top1")})
    create_table_artifact(key="train-metrics", table=rows, description=f"carrot train {store_url}")
    for name in ("learning_curves", "confusion"):
        if name in paths:
            create_image_artifact(
                image_url=png_data_url(paths[name]), key=f"train-{name.replace('_', '-')}"
            )
    return {**s, "out": out, "store": store.url}


@flow(name="train-top", log_prints=False, validate_parameters=False)
def train_top_flow(store_url: str, settings, out: str) -> dict:
    """Partially frozen training over a token cache (`pipeline.heads.top`), its run folder
    ``out`` and a summary artifact. Returns the result dict with ``files``."""
    from pipeline.heads.top import train_top
    from pipeline.heads.top_io import write_top_run

    store = open_store(store_url)
    trained = train_top(store, settings)
    result = trained.to_dict() | {"files": write_top_run(out, trained, store, settings)}
    losses = ", ".join(f"{v:.3f}" for v in result["train_loss"])
    create_markdown_artifact(
        key="train-top",
        markdown=f"# Partially frozen run\n\nstore `{store_url}`, {settings.blocks} trainable "
        f"block(s), aug {settings.aug}\n\n| epoch losses | val top-1 | test top-1 |\n|---|---|---|\n"
        f"| {losses} | {result['val_top1']} | {result['test_top1']} |\n",
    )
    return result


@flow(name="predict", log_prints=False, validate_parameters=False)
def predict_flow(
    store_url: str,
    head_dir: str,
    out_csv: str,
    split: str | None = None,
    allow_other_classes: bool = False,
) -> dict:
    """Predict every (valid) row of ``split`` (all splits when None) with a saved head or a
    partially frozen run (`pipeline.heads.predict.open_predictor`).

    The head must take the store's feature width (a run: the store's cache point); accuracy is computed (and the CSV's label
    column filled) only when the store has the head's classes, same names in the same order;
    other classes are refused unless ``allow_other_classes``."""
    store = open_store(store_url)
    predictor = open_predictor(head_dir, store, allow_other_classes=allow_other_classes)
    labelled = predictor.labelled
    X, ids = store.features(split), store.ids(split)
    labels = store.labels(split) if labelled else None
    _, probs = predict(predictor.model, X, batch_size=predictor.batch_rows)
    write_predictions_csv(
        out_csv, probs=probs, class_names=predictor.class_names, ids=ids, labels=labels
    )
    summary: dict = {"predictions": out_csv, "n": len(ids), "labelled": labelled}
    if labelled:
        from pipeline.heads.metrics import classification_metrics

        metrics = classification_metrics(labels, probs)
        summary.update({k: float(metrics[k]) for k in ("top1", "top5")})
    else:
        summary.update({"top1": None, "top5": None})
    return summary
