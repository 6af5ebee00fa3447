"""``dpmot eval``: FID, classifier mode mixture, memorisation and mixture metrics of samples.

``dpmot eval --samples URI [--ref-stats FILE.npz] [--inception FILE] [--classifier FILE.pt]
[--targets URI] [--gmm FILE] [--workers K] [--out report.json]`` evaluates a samples data set
(the output of ``dpmot sample``):

- FID against reference statistics (an ``.npz`` with ``mu`` (2048,) and ``sigma``
  (2048, 2048), pytorch-fid's and clean-fid's layout). Features come from the FID
  Inception-v3 (:mod:`dpmot_dist.evaluation.inception`) on K Ray actors (one GPU each when
  the cluster has GPUs), one Parquet chunk per task; ``--workers 0`` runs in process. Samples are
  quantised to 8 bits first, as their PNGs are. ``--fid-convention`` says how the 8-bit
  images become the network's input: ``pytorch-fid`` (the default: bilinear resize to 299,
  2·p/255 − 1) or ``clean-fid`` (PIL bicubic, (p − 128)/128); the report names it
  (``fid_convention``). Reference statistics made by ``--make-ref-stats`` record their
  convention, and statistics of another convention are refused.
- ``--classifier``: the mode-mixture rate of a TorchScript classifier ``model(x) -> logits``
  over thresholds t (a sample is mixed when ≥ 2 classes have probability ≥ t), and for
  labelled samples the label fidelity (the fraction it assigns to their own ``label``),
  overall and per class. It sees the decoded images of latent samples, else ``x``.
- ``--targets``: the memorisation rate against the training data (``--fresh`` held-out
  draws give the reference distances; else the training points' leave-one-out distances).
- ``--gmm``: mode mixture and mode-weight error under the mixture, sliced W2 and MMD to fresh
  draws, and memorisation with fresh draws of the mixture as the reference.

``dpmot eval --make-ref-stats --data URI --out stats.npz`` writes reference statistics of a
data set: images (``.npy``/``.npz``, Parquet, a folder of PNG/JPEG) or a samples data set.
Image files are read as RGB unless all are greyscale (``--mode``); float image arrays by
their range, as ``prepare`` reads them (``--scale``; :mod:`dpmot_dist.io.images`).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from dpmot_dist.config import Config
from dpmot_dist.errors import DpmotError
from dpmot_dist.evaluation import inception, metrics
from dpmot_dist.evaluation.inception import FidConvention
from dpmot_dist.io import datasets, images, storage
from dpmot_dist.io.readers import Block, Source, open_source
from dpmot_dist.runtime import actor_error, ensure_ray, gpus_per_actor, resolve_device

log = logging.getLogger(__name__)


class EvalConfig(Config):
    """Options of ``dpmot eval`` (config-file keys are the field names)."""

    GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "data": (
            "samples",
            "targets",
            "fresh",
            "gmm",
            "data",
            "mode",
            "scale",
            "max_samples",
            "seed",
        ),
        "metrics": (
            "ref_stats",
            "inception",
            "fid_convention",
            "classifier",
            "classifier_output",
            "thresholds",
        ),
        "cluster": ("workers", "cpus_per_worker", "device", "batch"),
        "output": ("out", "make_ref_stats"),
    }

    samples: str | None = Field(None, description="samples data set to evaluate")
    ref_stats: str | None = Field(None, description="FID reference statistics .npz (mu, sigma)")
    inception: str | None = Field(
        None,
        description=f"Inception weights file (default ${inception.WEIGHTS_ENV}, else "
        f"{inception.WEIGHT_FILES[0]} in torch hub's cache, $TORCH_HOME/hub/checkpoints)",
    )
    fid_convention: FidConvention = Field(
        "pytorch-fid",
        description="FID preprocessing: pytorch-fid (bilinear resize to 299, 2·p/255 − 1) or "
        "clean-fid (PIL bicubic resize to 299, (p − 128)/128)",
    )
    classifier: str | None = Field(None, description="TorchScript classifier model(x) → logits")
    classifier_output: Literal["logits", "probs"] = "logits"
    thresholds: list[float] | None = Field(None, description="classifier thresholds, e.g. 0.3,0.4")
    targets: str | None = Field(None, description="training data for memorisation (.npy/data set)")
    fresh: str | None = Field(None, description="held-out data: reference for memorisation")
    gmm: str | None = Field(None, description="Gaussian mixture .npz/.json: mode metrics")
    make_ref_stats: bool = Field(False, description="build FID statistics of --data into --out")
    data: str | None = Field(None, description="--make-ref-stats: images or a samples data set")
    mode: images.ColourMode = Field(
        "auto", description="--data image files: auto (RGB unless all are grey), L or RGB"
    )
    scale: Literal["auto", "none", "minus1_1", "minus1_1_from_255"] = Field(
        "auto",
        description="--data float images: auto (by their range), none ([−1, 1]), minus1_1 "
        "([0, 1]) or minus1_1_from_255 ([0, 255])",
    )
    out: str | None = Field(None, description="report .json (or stats .npz)")
    workers: int = Field(0, ge=0, description="Ray feature actors (0: in process)")
    cpus_per_worker: float = Field(1.0, gt=0)
    device: str = Field("auto", description="auto, cpu or cuda")
    batch: int = Field(100, ge=1, description="images per Inception forward pass")
    max_samples: int | None = Field(None, ge=2, description="use the first N samples only")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.make_ref_stats:
            if not (self.data and self.out):
                raise ValueError("--make-ref-stats needs --data and --out")
        elif not self.samples:
            raise ValueError("--samples is required (or --make-ref-stats --data --out)")
        return self


# ---------------------------------------------------------------------------------------------
# Image tasks: what one feature worker reads


@dataclass(frozen=True)
class ChunkImages:
    """One Parquet chunk of a samples data set: ``x`` rows of ``shape`` (in [−1, 1]), or the
    ``png`` images decoded from latent samples (``column="png"``)."""

    uri: str
    shape: tuple[int, ...]
    limit: int | None = None
    column: Literal["x", "png"] = "x"

    def images(self) -> np.ndarray:
        """(rows, C, H, W) uint8: the samples as their PNGs hold them (for latent samples, the
        decoded images)."""
        table = pq.read_table(io.BytesIO(storage.read_bytes(self.uri)), columns=[self.column])
        if self.limit is not None:
            table = table.slice(0, self.limit)
        if self.column == "png":
            return decode_pngs(self.uri, table.column("png").to_pylist(), self.shape)
        flat = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return images.to_uint8(flat.reshape(len(table), *self.shape), "minus1_1")


def decode_pngs(uri: str, data: list[bytes], shape: tuple[int, ...]) -> np.ndarray:
    """PNG bytes of (C, H, W) images → (B, C, H, W) uint8."""
    mode = "L" if shape[0] == 1 else "RGB"
    pixels = [images.decode_image(b, f"{uri} (row {r})", mode) for r, b in enumerate(data)]
    x = images.to_nchw(np.stack(pixels), "nhwc")
    if x.shape[1:] != tuple(shape):
        raise DpmotError(f"{uri}: PNG images of shape {list(x.shape[1:])}, manifest {list(shape)}")
    return x


@dataclass(frozen=True)
class SourceImages:
    """One block of an image data set (:mod:`dpmot_dist.io.readers`); stored values are read
    with ``scale`` (resolved by :func:`data_tasks`; ``value_range`` checked)."""

    source: Source
    block: Block
    scale: images.Scaling = "minus1_1"
    value_range: images.ValueRange | None = None

    def images(self) -> np.ndarray:
        """(rows, C, H, W) uint8."""
        raw = self.source.read(self.block)
        layout = image_layout(self.source)
        if raw.dtype != np.uint8 or self.scale != "minus1_1":
            if self.value_range is not None:
                images.check_range(raw, self.value_range, self.scale, self.block.name)
            raw = images.to_uint8(images.scale_pixels(raw, self.scale), "minus1_1")
        return images.to_nchw(raw, layout)


def image_layout(source: Source) -> str:
    """How a source's rows are images (``nchw``/``nhwc``, 1 or 3 channels); an error when
    they are not."""
    shape = tuple(source.row_shape)
    layout = "nhwc" if source.encoded else images.resolve_layout("auto", shape)
    if not images.is_image_rows(layout, shape):
        raise DpmotError(f"{source.uri}: rows of shape {shape} are not images (1 or 3 channels)")
    return layout


class FeatureWorker:
    """Loads the Inception network once; ``features(task)`` → (B, 2048) float32.

    Runs as a Ray actor (``--workers K``) or in process.
    """

    def __init__(
        self,
        weights: str | None,
        state: dict | None,
        device: str,
        batch: int,
        convention: FidConvention = "pytorch-fid",
    ) -> None:
        self.device = torch.device(resolve_device(device))
        self.model = inception.load_inception(weights, self.device, state)
        self.batch = batch
        self.convention = convention

    def features(self, task: ChunkImages | SourceImages) -> np.ndarray:
        pixels = torch.from_numpy(np.ascontiguousarray(task.images()))
        f = inception.inception_features(self.model, pixels, self.batch, self.convention)
        return f.float().numpy()


def compute_features(cfg: EvalConfig, tasks: list) -> np.ndarray:
    """Features of every task's images, in task order, on ``cfg.workers`` actors or here."""
    t0 = time.perf_counter()
    if not cfg.workers:
        worker = FeatureWorker(cfg.inception, None, cfg.device, cfg.batch, cfg.fid_convention)
        feats = [worker.features(t) for t in tasks]
    else:
        feats = _ray_features(cfg, tasks)
    out = np.concatenate(feats) if feats else np.empty((0, inception.FEATURES), np.float32)
    log.info(
        "Inception features (%s) of %d images in %.1f s",
        cfg.fid_convention,
        len(out),
        time.perf_counter() - t0,
    )
    return out


def _ray_features(cfg: EvalConfig, tasks: list) -> list[np.ndarray]:
    import ray

    ensure_ray()
    uri = inception.weights_path(cfg.inception)
    state = ray.put(inception.read_state_dict(uri))  # read once, shared via the object store
    gpus = gpus_per_actor(cfg.device)
    remote = ray.remote(FeatureWorker).options(num_cpus=cfg.cpus_per_worker, num_gpus=gpus)
    actors = [
        remote.remote(uri, state, cfg.device, cfg.batch, cfg.fid_convention)
        for _ in range(min(cfg.workers, len(tasks)))
    ]
    try:
        refs = [actors[i % len(actors)].features.remote(t) for i, t in enumerate(tasks)]
        try:
            return ray.get(refs)
        except Exception as e:
            raise actor_error(e, "eval worker") from None
    finally:
        for a in actors:
            ray.kill(a)


# ---------------------------------------------------------------------------------------------
# Inputs


def chunk_tasks(uri: str, max_samples: int | None = None) -> list[ChunkImages]:
    """One task per chunk of a samples data set (the first ``max_samples`` rows)."""
    m = datasets.read_samples_manifest(uri)
    decoded = bool(m.get("image_shape"))
    shape = tuple(m["image_shape"] if decoded else m["data_shape"])
    if not (len(shape) == 3 and shape[0] in (1, 3)):
        raise DpmotError(f"{uri}: FID needs image samples (C, H, W), got data shape {list(shape)}")
    tasks, left = [], max_samples if max_samples is not None else m["num"]
    for name in m["files"]:
        if left <= 0:
            break
        take = min(left, m["chunk"])
        column = "png" if decoded else "x"
        tasks.append(ChunkImages(storage.join(uri, name), shape, take, column))
        left -= take
    return tasks


def data_tasks(
    uri: str,
    max_samples: int | None = None,
    rows: int = 1024,
    mode: images.ColourMode = "auto",
    scale: images.Scale = "auto",
) -> list:
    """Tasks over a data set of images (colour ``mode``; values read with ``scale``, float
    images in ``auto`` by the range of the first block), or over a samples data set's chunks."""
    if datasets.manifest_kind(uri) == datasets.SAMPLES_KIND:
        return chunk_tasks(uri, max_samples)
    source = open_source(uri, mode=mode)
    image_layout(source)  # fail here, not in every task
    floats = np.dtype(source.dtype).kind == "f"
    head = source.head(rows) if scale == "auto" and floats else None
    scaling, value_range = images.resolve_scale(scale, np.dtype(source.dtype), head, uri)
    n = source.n if max_samples is None else min(source.n, max_samples)
    view = source.worker_view()
    blocks = [b for b in source.blocks(rows) if b.start < n]
    return [SourceImages(view, b, scaling, value_range) for b in blocks]


def read_points(uri: str, max_rows: int | None = None) -> np.ndarray:
    """Rows (N, D) float32 of a .npy, a targets data set, a samples data set or any data set."""
    kind = datasets.manifest_kind(uri)
    if kind == datasets.SAMPLES_KIND:
        _, table = datasets.read_samples(uri)
        x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        x = x.reshape(len(table), -1)
    elif uri.rstrip("/").lower().endswith(".npy") or kind is not None:
        x = datasets.load_targets(uri)
    else:
        source = open_source(uri)
        x = np.concatenate([source.read(b) for b in source.blocks(65536)]).reshape(source.n, -1)
    x = np.asarray(x[:max_rows] if max_rows else x, np.float32)
    return x.reshape(len(x), -1)


def load_ref_stats(
    uri: str, convention: FidConvention = "pytorch-fid"
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an .npz reference statistics file; refused when the file names a FID
    convention (``fid_convention``, as :func:`save_ref_stats` writes) other than ``convention``.
    """
    try:
        z = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
        mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        theirs = str(z["fid_convention"]) if "fid_convention" in z.files else None
    except KeyError as e:
        raise DpmotError(f"{uri}: reference statistics lack {e} (need mu and sigma)") from None
    except (ValueError, OSError) as e:
        raise DpmotError(f"{uri}: not an .npz of FID statistics ({e})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DpmotError(f"{uri}: mu {mu.shape} and sigma {sigma.shape} do not match")
    if len(mu) != inception.FEATURES:
        raise DpmotError(f"{uri}: statistics of {len(mu)} features; Inception pool3 has 2048")
    if theirs is None:
        log.info("%s does not name its FID convention; taken to be %s", uri, convention)
    elif theirs != convention:
        raise DpmotError(
            f"{uri}: reference statistics of the {theirs} FID convention, features here are "
            f"{convention}'s; pass --fid-convention {theirs} or make the statistics with "
            f"--fid-convention {convention}"
        )
    return mu, sigma


def save_ref_stats(
    uri: str, mu: np.ndarray, sigma: np.ndarray, n: int, convention: FidConvention
) -> None:
    """``mu``, ``sigma`` (pytorch-fid's and clean-fid's keys), ``num`` and ``fid_convention``."""
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, num=np.int64(n), fid_convention=np.array(convention))
    storage.write_bytes_atomic(uri, buf.getvalue())


def load_classifier(uri: str, device: torch.device):
    """A TorchScript module (safe loader), in eval mode on ``device``."""
    try:
        module = torch.jit.load(io.BytesIO(storage.read_bytes(uri)), map_location=device)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise DpmotError(f"{uri}: not a TorchScript module ({reason})") from None
    return module.eval()


# ---------------------------------------------------------------------------------------------
# The pipeline


def make_ref_stats(cfg: EvalConfig) -> dict[str, Any]:
    """Inception statistics of ``cfg.data`` written to ``cfg.out`` (.npz with mu, sigma and
    the FID convention)."""
    tasks = data_tasks(cfg.data, cfg.max_samples, mode=cfg.mode, scale=cfg.scale)
    feats = compute_features(cfg, tasks)
    if cfg.max_samples is not None:
        feats = feats[: cfg.max_samples]
    mu, sigma = metrics.feature_statistics(feats)
    save_ref_stats(cfg.out, mu, sigma, len(feats), cfg.fid_convention)
    return {
        "data": cfg.data,
        "out": cfg.out,
        "num": len(feats),
        "fid_convention": cfg.fid_convention,
    }


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Every metric the options ask for; the report (also written to ``cfg.out``)."""
    if cfg.make_ref_stats:
        return make_ref_stats(cfg)
    manifest = datasets.read_samples_manifest(cfg.samples)
    report: dict[str, Any] = {"samples": cfg.samples, "num": manifest["num"]}
    if cfg.ref_stats:
        # fail before the slow part
        mu_ref, sigma_ref = load_ref_stats(cfg.ref_stats, cfg.fid_convention)
        feats = compute_features(cfg, chunk_tasks(cfg.samples, cfg.max_samples))
        report["fid"] = metrics.frechet_distance(
            *metrics.feature_statistics(feats), mu_ref, sigma_ref
        )
        report["fid_samples"] = len(feats)
        report["fid_convention"] = cfg.fid_convention
    needs_points = cfg.classifier or cfg.targets or cfg.gmm
    x = read_points(cfg.samples, cfg.max_samples) if needs_points else None
    if cfg.classifier:
        report.update(classifier_report(cfg, *classifier_inputs(cfg, manifest, x)))
    mixture = None
    if cfg.gmm:
        from dpmot_dist.diffusion.models import GaussianMixture

        mixture = GaussianMixture.load(cfg.gmm)
        if mixture.dim != x.shape[1]:
            raise DpmotError(f"{cfg.gmm}: mixture in D={mixture.dim}, samples in D={x.shape[1]}")
        fresh = mixture.sample(len(x), torch.Generator().manual_seed(cfg.seed)).numpy()
        report.update(metrics.mode_metrics(x, mixture))
        report["sliced_w2"] = metrics.sliced_w2(x, fresh, seed=cfg.seed)
        report["mmd"] = metrics.mmd_rbf(x[:4096], fresh[:4096])
    if cfg.targets:
        targets = read_points(cfg.targets)
        if targets.shape[1] != x.shape[1]:
            raise DpmotError(f"{cfg.targets}: D={targets.shape[1]}, samples D={x.shape[1]}")
        if cfg.fresh:
            fresh = read_points(cfg.fresh)
        elif mixture is not None:
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            fresh = mixture.sample(max(len(x), 2000), gen).numpy()
        else:
            fresh = None
        report.update(metrics.memorisation_rate(x, targets, fresh))
        report["memorisation_reference"] = (
            "fresh draws" if fresh is not None else "leave-one-out targets"
        )
    if cfg.out:
        storage.write_json_atomic(cfg.out, report)
    return report


def classifier_inputs(
    cfg: EvalConfig, manifest: dict, x: np.ndarray
) -> tuple[np.ndarray, tuple[int, ...], np.ndarray | None]:
    """What the classifier sees (decoded images of latent samples, else x), its per-row shape
    and the samples' labels (None when unlabelled)."""
    labels = None
    if "label" in manifest.get("columns", []):
        _, table = datasets.read_samples(cfg.samples)
        labels = table.column("label").to_numpy()[: len(x)]
    if not manifest.get("image_shape"):
        return x, tuple(manifest["data_shape"]), labels
    tasks = chunk_tasks(cfg.samples, cfg.max_samples)
    pixels = np.concatenate([t.images() for t in tasks])  # uint8, as their PNGs hold them
    decoded = images.scale_pixels(pixels, "minus1_1")  # in the data's range [−1, 1], as x is
    return decoded.reshape(len(decoded), -1), tuple(manifest["image_shape"]), labels


def classifier_report(
    cfg: EvalConfig, x: np.ndarray, shape: tuple[int, ...], labels: np.ndarray | None = None
) -> dict:
    """Classifier mode-mixture rates per threshold (``classifier_mixture``) and, given the
    samples' labels, their label fidelity."""
    device = torch.device(resolve_device(cfg.device))
    model = load_classifier(cfg.classifier, device)
    xs = torch.from_numpy(np.array(x.reshape(len(x), *shape))).to(device)
    try:
        probs = metrics.classifier_probabilities(
            model, xs, logits=cfg.classifier_output == "logits"
        )
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise DpmotError(
            f"{cfg.classifier}: failed on samples of shape {shape} ({reason})"
        ) from None
    if probs.ndim != 2:
        raise DpmotError(f"{cfg.classifier}: expected (B, classes) output, got {probs.shape}")
    thresholds = tuple(cfg.thresholds or metrics.THRESHOLDS)
    report = {"classifier_mixture": metrics.classifier_mixture(probs, thresholds)}
    if labels is not None:
        report.update(metrics.label_fidelity(probs, labels))
    return report


def format_report(report: dict) -> str:
    """The report as aligned ``name: value`` lines."""
    lines = []
    for k, v in report.items():
        if isinstance(v, dict):
            name = "t=" if k == "classifier_mixture" else "class "
            v = ", ".join(f"{name}{t}: {r:.2%}" for t, r in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        lines.append(f"{k:>24}: {v}")
    return "\n".join(lines)
