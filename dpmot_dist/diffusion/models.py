"""Denoisers behind one contract: ``model.eps(x_t, t, y=None) -> ε̂``.

A :class:`Denoiser` predicts the noise ε of x_t = a_t x_0 + s_t ε at integer timesteps t
(int64, shape [B]) of its :class:`~dpmot_dist.diffusion.schedules.Schedule`; x_t has the data shape
(B, *shape); a class-conditional model (``conditional``) also takes class ids y (int64, [B]).
Every sampler in :mod:`dpmot_dist.diffusion.samplers` is written against ``eps(x_t, t)``
alone: :class:`ClassConditioned` binds a batch's labels (and classifier-free guidance) to a
conditional model, and the adapters below turn each model kind into the contract (the
k-diffusion ``external`` pattern):

- ``gmm:FILE``: the exact ε of a Gaussian mixture Σ_c π_c N(m_c, s_c² I), whose marginal at
  t is Σ_c π_c N(a_t m_c, (a_t² s_c² + s_t²) I) for VP and VE alike (DESIGN §2);
- ``diffusers:DIR``: a ``diffusers.UNet2DModel`` (class-conditional with class embeddings) or
  a DiT (``DiTTransformer2DModel`` / ``Transformer2DModel``, conditional), a local or any
  fsspec folder: a model folder, or a pipeline folder written by ``save_pretrained``
  (DDPMPipeline: ``unet/`` + ``scheduler/``; DiTPipeline: ``transformer/`` + ``vae/`` +
  ``scheduler/``; a latent pipeline: ``unet/`` + ``vae/``), ε-, v- or x_0-prediction as its
  scheduler config says (:func:`pipeline_schedule` and :func:`pipeline_vae` read the rest);
- ``torchscript:FILE``: ``torch.jit.load`` of a module called as ``model(x_t, t)``
  (``model(x_t, t, y)`` with ``conditional``), returning ε (or v / x_0 with ``prediction``).

Only safe loaders are used: ``torch.jit.load`` for TorchScript, diffusers' safetensors (or
``torch.load(weights_only=True)``) for UNets, ``numpy.load(allow_pickle=False)`` and JSON for
mixtures.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Protocol

import numpy as np
import torch

from dpmot_dist.diffusion.schedules import Schedule
from dpmot_dist.errors import DpmotError
from dpmot_dist.io import storage

log = logging.getLogger(__name__)

Prediction = Literal["auto", "eps", "v", "x0"]
PREDICTIONS = ("auto", "eps", "v", "x0")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class Denoiser(Protocol):
    """The contract every sampler uses: ε̂ = eps(x_t, t) for x_t = a_t x_0 + s_t ε.

    A class-conditional model has ``conditional`` set and needs y; ``class_rows`` is the size
    of its class embedding when known (labels and the null class must be below it).
    """

    schedule: Schedule
    data_shape: tuple[int, ...] | None

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ (B, *shape) for x_t (B, *shape) at integer timesteps t (B,) int64, classes y (B,)."""
        ...


# ---------------------------------------------------------------------------------------------
# Schedule coefficients and conversions


@lru_cache(maxsize=8)
def marginal_tables(schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) for t = 0..T−1 as float64 tensors: x_t = a_t x_0 + s_t ε."""
    if schedule.is_vp:
        ab = torch.from_numpy(np.asarray(schedule.alphas_cumprod, np.float64))
        return ab.sqrt(), (1.0 - ab).sqrt()
    s = torch.from_numpy(np.asarray(schedule.sigmas, np.float64))
    return torch.ones_like(s), s


def coefficients(
    schedule: Schedule, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, s_t) per row of ``like`` (B, ...), shaped (B, 1, ..., 1), in ``like``'s dtype."""
    a, s = marginal_tables(schedule)
    t = t.long().cpu()
    shape = (-1,) + (1,) * (like.ndim - 1)
    cast = {"device": like.device, "dtype": like.dtype}
    return a[t].reshape(shape).to(**cast), s[t].reshape(shape).to(**cast)


def to_x0(model: Denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − s_t ε̂) / a_t (Tweedie's denoised estimate)."""
    a, s = coefficients(model.schedule, t, x)
    return (x - s * model.eps(x, t)) / a


def to_score(model: Denoiser, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """∇ log p_t(x_t) = −ε̂ / s_t."""
    _, s = coefficients(model.schedule, t, x)
    return -model.eps(x, t) / s


def eps_from_prediction(
    out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction: str
) -> torch.Tensor:
    """ε from an ε-, v- or x_0-prediction of x_t = a x_0 + s ε.

    v = a ε − s x_0 (Salimans & Ho 2022) gives ε = (a v + s x_t) / (a² + s²);
    x_0 gives ε = (x_t − a x_0) / s.
    """
    if prediction == "eps":
        return out
    if prediction == "v":
        return (a * out + s * x) / (a * a + s * s)
    if prediction == "x0":
        return (x - a * out) / s
    raise ValueError(f"unknown prediction type {prediction!r}")


# ---------------------------------------------------------------------------------------------
# Exact Gaussian mixture


@dataclass(frozen=True)
class GaussianMixture:
    """Σ_c π_c N(m_c, s_c² I) in R^D: means (C, D), stds (C,), weights (C,) summing to 1."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        means = np.atleast_2d(np.asarray(self.means, np.float64))
        stds = np.asarray(self.stds, np.float64).reshape(-1)
        weights = np.asarray(self.weights, np.float64).reshape(-1)
        c = means.shape[0]
        if means.ndim != 2 or stds.shape != (c,) or weights.shape != (c,) or c == 0:
            raise DpmotError(
                f"Gaussian mixture: means must be C×D with C stds and C weights, got "
                f"{means.shape}, {stds.shape}, {weights.shape}"
            )
        arrays = (means, stds, weights)
        if not all(np.isfinite(v).all() for v in arrays) or (stds <= 0).any():
            raise DpmotError("Gaussian mixture: values must be finite and stds positive")
        if (weights < 0).any() or weights.sum() <= 0:
            raise DpmotError("Gaussian mixture: weights must be non-negative, not all zero")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n float32 draws (n, D): a component c ~ π, then m_c + s_c z."""
        w = torch.from_numpy(self.weights)
        c = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = torch.from_numpy(self.means)[c] + torch.from_numpy(self.stds)[c, None] * z
        return x.float()

    def _logits(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor):
        """Per-component log π_c N(x; a m_c, v_c I) (B, C) and v_c = a² s_c² + s² (B, C)."""
        m = torch.from_numpy(self.means).to(x.device)
        var = a**2 * torch.from_numpy(self.stds).to(x.device) ** 2 + s**2
        d2 = (x * x).sum(1, keepdim=True) - 2 * a * (x @ m.T) + a**2 * (m * m).sum(1)
        log_w = torch.from_numpy(np.log(np.maximum(self.weights, 1e-300))).to(x.device)
        logits = log_w - 0.5 * self.dim * torch.log(2 * math.pi * var) - 0.5 * d2 / var
        return logits, var

    def log_prob(
        self, x: torch.Tensor, a: float | torch.Tensor = 1.0, s: float | torch.Tensor = 0.0
    ):
        """log p(x) (B,) of the marginal Σ π_c N(a m_c, (a² s_c² + s²) I), in float64."""
        x, a, s = _as_rows(x, a, s)
        return torch.logsumexp(self._logits(x, a, s)[0], dim=1)

    def eps(self, x: torch.Tensor, a: float | torch.Tensor, s: float | torch.Tensor):
        """Exact ε̂ = −s ∇ log p(x) of the marginal at (a, s), x (B, D); float64.

        ∇ log p(x) = Σ_c r_c(x) (a m_c − x) / v_c with responsibilities r = softmax(logits).
        """
        x, a, s = _as_rows(x, a, s)
        logits, var = self._logits(x, a, s)
        r_over_v = torch.softmax(logits, dim=1) / var
        m = torch.from_numpy(self.means).to(x.device)
        score = a * (r_over_v @ m) - x * r_over_v.sum(1, keepdim=True)
        return -s * score

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable component of each clean point x (B, D) (int64)."""
        x, a, s = _as_rows(x, 1.0, 0.0)
        return self._logits(x, a, s)[0].argmax(1)

    def to_dict(self) -> dict:
        return {
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "weights": self.weights.tolist(),
        }

    def save(self, uri: str) -> None:
        """Write the mixture as ``.json`` or ``.npz`` (by the name's suffix), atomically."""
        uri = os.fspath(uri)
        if uri.lower().endswith(".json"):
            storage.write_json_atomic(uri, self.to_dict())
            return
        buf = io.BytesIO()
        np.savez(buf, means=self.means, stds=self.stds, weights=self.weights)
        storage.write_bytes_atomic(uri, buf.getvalue())

    @classmethod
    def load(cls, uri: str) -> GaussianMixture:
        """Read a mixture from a ``.json`` or ``.npz`` with keys means, stds, weights."""
        uri = os.fspath(uri)
        data = storage.read_bytes(uri)
        try:
            if uri.lower().endswith(".json"):
                d = json.loads(data)
            else:
                z = np.load(io.BytesIO(data), allow_pickle=False)
                if not isinstance(z, np.lib.npyio.NpzFile):
                    raise ValueError("expected an .npz archive")
                d = {k: z[k] for k in z.files}
            return cls(np.asarray(d["means"]), np.asarray(d["stds"]), np.asarray(d["weights"]))
        except DpmotError as e:
            raise DpmotError(f"{uri}: {e}") from None
        except KeyError as e:
            raise DpmotError(f"{uri}: Gaussian mixture file lacks key {e}") from None
        except (ValueError, TypeError, OSError, zipfile.BadZipFile) as e:
            raise DpmotError(f"{uri}: not a Gaussian mixture .json/.npz ({e})") from None


def _as_rows(x: torch.Tensor, a, s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as float64 (B, D); a and s as float64 (B, 1) (or broadcastable scalars)."""
    x = torch.as_tensor(x).reshape(len(x), -1).double()

    def col(v):
        v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
        return v.reshape(-1, 1) if v.ndim else v

    return x, col(a), col(s)


class GMMDenoiser:
    """The exact ε of a :class:`GaussianMixture` under a VP or VE schedule (``gmm:FILE``)."""

    def __init__(self, mixture: GaussianMixture, schedule: Schedule) -> None:
        self.mixture, self.schedule = mixture, schedule
        self.data_shape = (mixture.dim,)

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        a, s = coefficients(self.schedule, t, x.reshape(len(x), -1).double())
        return self.mixture.eps(x, a, s).to(x.dtype).reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Neural networks


class ModuleDenoiser:
    """A network f(x_t, t) (f(x_t, t, y) when ``conditional``) predicting ε, v or x_0, seen
    through the ε contract.

    Inputs are cast to the network's dtype and device; ε̂ comes back in x's dtype.
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        schedule: Schedule,
        *,
        prediction: str = "eps",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        data_shape: tuple[int, ...] | None = None,
        conditional: bool = False,
        class_rows: int | None = None,
    ) -> None:
        if prediction not in ("eps", "v", "x0"):
            raise DpmotError(f"prediction must be eps, v or x0, got {prediction!r}")
        self.fn, self.schedule, self.prediction = fn, schedule, prediction
        self.device, self.dtype, self.data_shape = torch.device(device), dtype, data_shape
        self.conditional, self.class_rows = conditional, class_rows

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        args = [x.to(self.device, self.dtype), t.to(self.device, torch.long)]
        if self.conditional:
            if y is None:
                raise DpmotError("a class-conditional model needs labels y")
            args.append(y.to(self.device, torch.long))
        out = self.fn(*args).to(x.device, x.dtype)
        if out.shape != x.shape:
            raise DpmotError(f"model returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        if self.prediction == "eps":
            return out
        a, s = coefficients(self.schedule, t, x)
        return eps_from_prediction(out, x, a, s, self.prediction)


# ---------------------------------------------------------------------------------------------
# Class conditioning


class ClassConditioned:
    """A class-conditional ``model`` with the labels y (B,) of its batch bound: ``eps(x_t, t)``.

    With a guidance scale s ≠ 1 it is classifier-free guidance (Ho & Salimans 2022),

        ε̂(x_t, t) = ε̂(x_t, t, ∅) + s · (ε̂(x_t, t, y) − ε̂(x_t, t, ∅)),

    ∅ the null class id; both halves go through the model as one doubled batch, which counts
    as 2 model evaluations per call (``evaluations``). (Guidance on ε equals guidance on v or
    x̂_0: the conversions are affine and the weights (1 − s, s) sum to 1.)
    """

    def __init__(
        self,
        model: Denoiser,
        y: torch.Tensor,
        guidance: float = 1.0,
        null_class: int | None = None,
    ) -> None:
        if guidance != 1.0 and null_class is None:
            raise DpmotError("classifier-free guidance needs the null class id")
        self.model, self.y, self.guidance, self.null_class = model, y.long(), guidance, null_class
        self.schedule, self.data_shape = model.schedule, model.data_shape
        self.evaluations = 1 if guidance == 1.0 else 2

    def eps(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        if self.evaluations == 1:
            return self.model.eps(x, t, self.y)
        null = torch.full_like(self.y, self.null_class)
        both = self.model.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.y, null]))
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)


@dataclass(frozen=True)
class ModelClasses:
    """What a model says about classes, read from its files without loading weights.

    ``conditional``: it needs labels; ``rows``: the size of its class embedding when known
    (DiT: its classes + 1, the last one the null class).
    """

    conditional: bool = False
    rows: int | None = None


def model_classes(spec: str, conditional: bool = False) -> ModelClasses:
    """Whether the model ``spec`` is class-conditional (TorchScript: as ``conditional`` says),
    from its config files alone."""
    kind, where = parse_spec(spec)
    if kind == "gmm":
        return ModelClasses()
    if kind == "torchscript":
        return ModelClasses(conditional)
    uri = storage.join(denoiser_folder(where.rstrip("/")), "config.json")
    if not storage.exists(uri):
        return ModelClasses()  # load_model reports the missing model
    config = storage.read_json(uri)
    return network_classes(_network_name(uri, config), config)


# ---------------------------------------------------------------------------------------------
# diffusers models and pipeline folders

NETWORKS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
_DENOISER_FOLDERS = ("unet", "transformer")  # a pipeline's denoiser, as diffusers names it
_BETA_SCHEDULES = {
    "linear": "vp-linear",
    "scaled_linear": "vp-scaled-linear",
    "squaredcos_cap_v2": "vp-cosine",
}


def denoiser_folder(root: str) -> str:
    """The folder of the denoiser's ``config.json``: a pipeline's ``unet/`` (DDPMPipeline,
    latent pipelines) or ``transformer/`` (DiTPipeline), else ``root`` (a model folder)."""
    for sub in _DENOISER_FOLDERS:
        if storage.exists(storage.join(root, sub, "config.json")):
            return storage.join(root, sub)
    return root


def _network_name(uri: str, config: dict) -> str:
    """The diffusers class of a denoiser config (UNet2DModel when it does not say)."""
    name = config.get("_class_name", "UNet2DModel")
    if name not in NETWORKS:
        raise DpmotError(f"{uri}: {name} is not a supported denoiser ({', '.join(NETWORKS)})")
    if name == "Transformer2DModel" and config.get("norm_type") != "ada_norm_zero":
        raise DpmotError(f"{uri}: a Transformer2DModel without ada_norm_zero is not a DiT")
    return name


def network_classes(name: str, config: dict) -> ModelClasses:
    """Classes of a diffusers denoiser: a UNet2DModel's class embedding (``num_class_embeds``
    rows), DiT's label embedding (``num_embeds_ada_norm`` classes and the null class)."""
    if name == "UNet2DModel":
        rows = config.get("num_class_embeds")
        return ModelClasses(rows is not None or config.get("class_embed_type") is not None, rows)
    classes = config.get("num_embeds_ada_norm")
    return ModelClasses(True, None if classes is None else int(classes) + 1)


def pipeline_schedule(spec: str) -> Schedule | None:
    """The β schedule in a diffusers pipeline folder's ``scheduler/`` (None without one)."""
    kind, where = parse_spec(spec)
    uri = storage.join(where.rstrip("/"), "scheduler", "scheduler_config.json")
    if kind != "diffusers" or not storage.exists(uri):
        return None
    cfg = storage.read_json(uri)
    betas = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None or betas not in _BETA_SCHEDULES:
        raise DpmotError(
            f"{uri}: beta_schedule {betas!r} (or trained_betas) not supported; use "
            f"{', '.join(_BETA_SCHEDULES)} or pass --schedule"
        )
    return Schedule(
        kind=_BETA_SCHEDULES[betas],
        num_steps=int(cfg.get("num_train_timesteps", 1000)),
        beta_start=float(cfg.get("beta_start", 1e-4)),
        beta_end=float(cfg.get("beta_end", 0.02)),
    )


def pipeline_vae(spec: str) -> str | None:
    """The ``vae/`` folder of a diffusers pipeline (DiTPipeline, latent pipelines), if any."""
    kind, where = parse_spec(spec)
    uri = storage.join(where.rstrip("/"), "vae")
    return uri if kind == "diffusers" and storage.exists(storage.join(uri, "config.json")) else None


def _diffusers_prediction(folder: str) -> str:
    """ε / v / x_0 from ``prediction_type`` in the folder's scheduler or model config."""
    for name in ("scheduler/scheduler_config.json", "scheduler_config.json", "config.json"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                kind = json.load(f).get("prediction_type")
            if kind is not None:
                if kind not in _DIFFUSERS_PREDICTIONS:
                    raise DpmotError(f"{path}: prediction_type {kind!r} not supported")
                return _DIFFUSERS_PREDICTIONS[kind]
    return "eps"


def _check_diffusers_schedule(folder: str, schedule: Schedule) -> None:
    """Warn when the folder's scheduler config was trained with another β schedule."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.exists(path) or not schedule.is_vp:
        return
    with open(path) as f:
        cfg = json.load(f)
    ours = schedule.ddpm_scheduler_kwargs()
    diff = {k: (cfg[k], v) for k, v in ours.items() if k in cfg and cfg[k] != v}
    if diff:
        log.warning("%s: scheduler differs from the targets' schedule: %s", path, diff)


def load_network(folder: str, device: torch.device, dtype: torch.dtype):
    """(network, class name): the UNet2DModel or DiT of a local model or pipeline folder."""
    try:
        import diffusers
    except ImportError:
        raise DpmotError("diffusers models need the 'diffusers' package") from None
    where = denoiser_folder(folder)
    path = os.path.join(where, "config.json")
    config = {}
    if os.path.exists(path):
        with open(path) as f:
            config = json.load(f)
    name = _network_name(path, config)
    try:
        net = getattr(diffusers, name).from_pretrained(where, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DpmotError(f"{folder}: cannot load a {name} ({reason})") from None
    return net.to(device, dtype).eval(), name


def _network_call(net, name: str) -> Callable[..., torch.Tensor]:
    """f(x_t, t, y=None) of a diffusers network; a DiT that learns Σ returns ε's channels."""
    channels = net.config.in_channels

    def unet(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, t, class_labels=y).sample

    def dit(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return net(x, timestep=t, class_labels=y).sample[:, :channels]

    return unet if name == "UNet2DModel" else dit


def _load_diffusers(uri: str, schedule, device, dtype, prediction) -> ModuleDenoiser:
    fs, path = storage.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return _diffusers_from_folder(path, schedule, device, dtype, prediction)
    with tempfile.TemporaryDirectory(prefix="dpmot-unet-") as tmp:
        if not storage.retrying(uri, fs.isdir, path):
            raise DpmotError(f"{uri}: no such folder")
        root = path.rstrip("/")
        for part in _needed_parts(fs, root):
            src = f"{root}/{part}/" if part else f"{root}/"
            storage.retrying(uri, fs.get, src, f"{tmp}/{part}", recursive=True)
        return _diffusers_from_folder(tmp, schedule, device, dtype, prediction)


def _needed_parts(fs, path: str) -> list[str]:
    """What loading needs of a remote folder: a pipeline's denoiser and scheduler (its VAE
    is the decoder's business), else the whole model folder."""
    for sub in _DENOISER_FOLDERS:
        if fs.exists(f"{path}/{sub}/config.json"):
            return [sub] + (["scheduler"] if fs.isdir(f"{path}/scheduler") else [])
    return [""]


def _diffusers_from_folder(folder, schedule, device, dtype, prediction) -> ModuleDenoiser:
    if not os.path.isdir(folder):
        raise DpmotError(f"{folder}: no such folder")
    net, name = load_network(folder, device, dtype)
    kind = _diffusers_prediction(folder) if prediction == "auto" else prediction
    _check_diffusers_schedule(folder, schedule)
    size = net.config.sample_size
    hw = tuple(size) if isinstance(size, list | tuple) else (size, size)
    shape = (net.config.in_channels, *hw)
    classes = network_classes(name, net.config)
    return ModuleDenoiser(
        _network_call(net, name),
        schedule,
        prediction=kind,
        device=device,
        dtype=dtype,
        data_shape=shape,
        conditional=classes.conditional,
        class_rows=classes.rows,
    )


def _load_torchscript(
    uri: str, schedule, device, dtype, prediction, conditional: bool = False
) -> ModuleDenoiser:
    data = storage.read_bytes(uri)
    try:
        with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; it is the contract
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise DpmotError(f"{uri}: not a TorchScript module ({reason})") from None
    module = module.to(dtype).eval()
    kind = "eps" if prediction == "auto" else prediction
    return ModuleDenoiser(
        module, schedule, prediction=kind, device=device, dtype=dtype, conditional=conditional
    )


def parse_spec(spec: str) -> tuple[str, str]:
    """``kind:LOCATION`` → (kind, location); kinds gmm, diffusers, torchscript."""
    kind, sep, where = spec.partition(":")
    if not sep or kind not in ("gmm", "diffusers", "torchscript") or not where:
        raise DpmotError(
            f"model spec {spec!r}: expected gmm:FILE, diffusers:DIR or torchscript:FILE"
        )
    return kind, where


def load_model(
    spec: str,
    schedule: Schedule,
    device: torch.device | str = "cpu",
    dtype: str = "float32",
    prediction: str = "auto",
    conditional: bool = False,
) -> Denoiser:
    """The denoiser named by ``spec`` (``gmm:FILE``, ``diffusers:DIR``, ``torchscript:FILE``).

    ``prediction`` (auto, eps, v, x0) says what a network returns; ``auto`` is the diffusers
    config's ``prediction_type`` (ε when absent) and ε for TorchScript. The exact mixture
    ignores ``dtype`` and ``prediction`` (it computes ε in float64). ``conditional``: a
    TorchScript module takes class labels, ``model(x_t, t, y)`` (diffusers models say so in
    their config).
    """
    kind, where = parse_spec(spec)
    if dtype not in DTYPES:
        raise DpmotError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if prediction not in PREDICTIONS:
        raise DpmotError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    device = torch.device(device)
    if kind == "gmm":
        return GMMDenoiser(GaussianMixture.load(where), schedule)
    if kind == "torchscript":
        return _load_torchscript(where, schedule, device, DTYPES[dtype], prediction, conditional)
    return _load_diffusers(where, schedule, device, DTYPES[dtype], prediction)
