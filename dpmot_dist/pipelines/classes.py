"""Which class each sample gets, and what the model takes (``sample`` with labels).

- The model's classes (:func:`resolve_classes`): a class-conditional model needs labels,
  which come from the targets (their manifest's ``labels``: number of classes, counts) or,
  from noise without targets, ``--labels``; the null class of classifier-free guidance
  defaults to the number of classes C (DiT's convention: classes 0..C−1, then the null class).
- Classes first (:func:`classes_first`): with a ``fit --by-label`` potential, and for
  from-noise baselines of class-conditional models, a sample's class is chosen before any
  map: ``--per-label K`` gives K of each chosen class in order, otherwise class c is drawn
  with probability ∝ its count among the chosen ones from the sample's own stream
  (seed, STREAM_LABEL, sample_id). The map then searches class c's cells only
  (:func:`label_groups`: h is :data:`~dpmot_dist.pipelines.ot_map.MASKED` elsewhere).
- Otherwise a sample's label is its OT winner's, y_{i*} (:func:`plan_labels`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from dpmot_dist.diffusion.models import ModelClasses, model_classes
from dpmot_dist.diffusion.samplers import STREAM_LABEL, uniforms
from dpmot_dist.errors import DpmotError
from dpmot_dist.pipelines.ot_map import MASKED, MapPlan

if TYPE_CHECKING:
    from dpmot_dist.pipelines.sample import RunInfo, SampleConfig


def resolve_classes(cfg: SampleConfig, manifest: dict) -> dict[str, Any]:
    """The model's classes, the targets' labels and the null class; checks they fit."""
    classes = model_classes(cfg.model, cfg.conditional)
    guided = cfg.guidance_scale not in (None, 1.0)
    if guided and not classes.conditional:
        raise DpmotError(f"{cfg.model}: --guidance-scale needs a class-conditional model")
    if cfg.from_noise and (cfg.labels or cfg.per_label) and not classes.conditional:
        raise DpmotError(f"{cfg.model}: --labels from noise need a class-conditional model")
    labels = manifest.get("labels") or chosen_without_targets(cfg, classes)
    if classes.conditional and labels is None:
        where = cfg.targets or "--from-noise without --targets"
        raise DpmotError(
            f"{where}: {cfg.model} is class-conditional but there are no labels; prepare a "
            "labelled data set (or pass --labels from noise)"
        )
    if labels is None:
        return {"classes": classes, "labels": None, "null_class": None}
    if cfg.labels and max(cfg.labels) >= labels["num_classes"]:
        raise DpmotError(
            f"{cfg.targets or cfg.model}: label {max(cfg.labels)} is not among the "
            f"{labels['num_classes']} classes"
        )
    # DiT's convention: classes 0..C−1, then the null class C
    null = labels["num_classes"] if cfg.null_class is None else cfg.null_class
    rows = classes.rows if classes.conditional else None
    if rows is not None and labels["num_classes"] > rows:
        raise DpmotError(f"{cfg.model}: {labels['num_classes']} classes, {rows} embeddings")
    if rows is not None and guided and null >= rows:
        raise DpmotError(
            f"{cfg.model}: null class {null} is outside the model's {rows} class embeddings; "
            "pass --null-class"
        )
    return {"classes": classes, "labels": labels, "null_class": null if guided else None}


def chosen_without_targets(cfg: SampleConfig, classes: ModelClasses) -> dict | None:
    """From noise without labelled targets: ``--labels`` chosen with equal weights, among the
    model's classes (its embeddings but the last, the null class, when it declares them)."""
    if not (cfg.from_noise and cfg.labels and classes.conditional):
        return None
    num_classes = classes.rows - 1 if classes.rows else max(cfg.labels) + 1
    counts = np.zeros(max(num_classes, max(cfg.labels) + 1), np.int64)
    counts[cfg.labels] = 1
    return {"num_classes": num_classes, "counts": counts.tolist()}


def resolve_num(cfg: SampleConfig, info: RunInfo) -> SampleConfig:
    """The options with ``num`` = K × the number of classes under ``--per-label K``."""
    if cfg.per_label is None:
        return cfg
    num = cfg.per_label * len(chosen_classes(cfg, info))
    if cfg.num is not None and cfg.num != num:
        raise DpmotError(f"--num {cfg.num} with --per-label {cfg.per_label}: there are {num}")
    return cfg.model_copy(update={"num": num})


def chosen_classes(cfg: SampleConfig, info: RunInfo) -> np.ndarray:
    """The classes samples are drawn from: ``--labels``, else every class with targets."""
    counts = np.asarray(info.labels["counts"])
    if not cfg.labels:
        return np.flatnonzero(counts)
    chosen = np.unique(cfg.labels)
    if info.by_label and (counts[chosen] == 0).any():
        c = int(chosen[np.argmax(counts[chosen] == 0)])
        raise DpmotError(f"{cfg.targets}: class {c} has no targets, hence no cells")
    return chosen


def draw_labels(seed: int, sample_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Class ids c ~ weights (C,) for each sample, from its own stream (seed, STREAM_LABEL)."""
    cdf = np.cumsum(np.asarray(weights, np.float64))
    u = uniforms(seed, STREAM_LABEL, sample_ids, 1)[:, 0] * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1).astype(np.int64)


def classes_first(cfg: SampleConfig, info: RunInfo) -> np.ndarray | None:
    """Labels chosen before the map: for a ``--by-label`` potential and for from-noise
    baselines of class-conditional models. ``--per-label K``: K of each chosen class, in
    order; else a draw by the targets' histogram among them, per sample. None otherwise."""
    if not (info.by_label or (cfg.from_noise and info.classes.conditional)):
        return None
    chosen = chosen_classes(cfg, info)
    if cfg.per_label is not None:
        return np.repeat(chosen, cfg.per_label)
    weights = np.asarray(info.labels["counts"], np.float64)[chosen]
    weights = weights if weights.sum() > 0 else np.ones(len(chosen))
    return chosen[draw_labels(cfg.seed, np.arange(cfg.num), weights)]


def plan_labels(info: RunInfo, plan: MapPlan, first: np.ndarray | None) -> np.ndarray | None:
    """Each sample's label: chosen first (:func:`classes_first`), else its OT winner's
    y_{i*}; None for unlabelled runs."""
    if first is not None or info.target_labels is None or (plan.ot_index < 0).any():
        return first
    return info.target_labels[plan.ot_index]


def label_groups(
    ids: np.ndarray, info: RunInfo, labels: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(sample ids, h, reachable targets) per search: all samples with h, or for a
    ``--by-label`` potential the samples of each class c with h masked outside I_c."""
    if not info.by_label:
        yield ids, info.h, None
        return
    for c in np.unique(labels):
        cell = info.target_labels == c
        yield ids[labels == c], np.where(cell, info.h, MASKED), cell
