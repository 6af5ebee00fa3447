"""Where the work runs: the Ray cluster, the torch device, and errors from remote workers.

Used by every pipeline and evaluation; nothing here knows about OT or diffusion.
"""

from __future__ import annotations

import os
import re

import torch

from dpmot_dist.errors import DpmotError


def ensure_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local one (token auth stays on)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cluster_gpus() -> bool:
    """Whether the Ray cluster has any GPU."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def gpus_per_actor(device: str) -> int:
    """1 when actors should hold a GPU (``cuda``, or ``auto`` on a cluster with GPUs)."""
    return 1 if device.startswith("cuda") or (device == "auto" and cluster_gpus()) else 0


def set_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch, the numba kernels and FAISS (None: defaults)."""
    if not threads:
        return
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    try:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass


def remote_error(e: Exception) -> Exception:
    """The user-facing error inside a Ray task error (a DpmotError keeps its one line)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, DpmotError) else e


def actor_error(e: Exception, what: str = "worker") -> Exception:
    """The creation error of an actor (e.g. an unreadable model) as a one-line DpmotError."""
    inner = remote_error(e)
    if isinstance(inner, DpmotError):
        return inner
    text = str(e)
    found = re.search(r"DpmotError: (.+)", text)
    reason = found.group(1).strip() if found else text.strip().splitlines()[0][:300]
    return DpmotError(f"{what} failed to start: {reason}")
