"""``dpmot bench decode``: sample throughput of a latent, class-conditional run, with and without
decoding.

Builds a tiny random latent pipeline in a temporary folder (nothing is downloaded): a diffusers
``AutoencoderKL`` (3×S×S images ↔ 4×S/2×S/2 latents) and a class-conditional ``UNet2DModel``
saved as ``unet/`` + ``vae/`` + ``scheduler/``, labelled random images in class subfolders.
It runs ``prepare --vae`` → ``fit`` → ``sample`` (the latent UNet, DDIM, classifier-free
guidance) twice through the pipeline functions: decoding the latents to PNG images, then
with ``--vae none``. Reported: samples/s of each, the decode's share of the workers' time,
and the in-run estimate of samples/s without decoding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from dpmot_dist.io import images
from dpmot_dist.pipelines.fit import FitConfig, run_fit
from dpmot_dist.pipelines.prepare import PrepareConfig, run_prepare
from dpmot_dist.pipelines.sample import SampleConfig, run_sample


def save_pipeline(folder: Path, size: int, classes: int) -> str:
    """A random latent pipeline: unet/ (class embeddings of ``classes`` + 1 rows), vae/,
    scheduler/, written by ``save_pretrained``."""
    import diffusers
    import torch

    class LatentPipeline(diffusers.DiffusionPipeline):
        def __init__(self, unet, vae, scheduler) -> None:
            super().__init__()
            self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    torch.manual_seed(0)
    blocks = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=size,
        **blocks,
    )
    unet = diffusers.UNet2DModel(
        sample_size=size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        num_class_embeds=classes + 1,
        **blocks,
    )
    pipe = LatentPipeline(unet=unet, vae=vae, scheduler=diffusers.DDPMScheduler())
    pipe.save_pretrained(str(folder))
    return str(folder)


def labelled_images(root: Path, size: int, classes: int, per_class: int) -> str:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:03d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            (root / f"class{c:03d}" / f"{i}.png").write_bytes(images.encode_png(pixels))
    return str(root)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="dpmot-bench-decode-") as tmp:
        root = Path(tmp)
        pipeline = save_pipeline(root / "pipe", args.image_size, args.classes)
        data = labelled_images(root / "data", args.image_size, args.classes, args.per_class)
        targets, fit = str(root / "targets"), str(root / "fit")
        run_prepare(PrepareConfig(data=data, out=targets, vae=pipeline, step=50, workers=0))
        run_fit(FitConfig(targets=targets, out=fit, iters=10, eval_samples=0, lattice=0))
        common = {
            "targets": targets,
            "potential": fit,
            "model": f"diffusers:{pipeline}",
            "num": args.num,
            "sampler": "ddim",
            "nfe": args.nfe,
            "guidance_scale": args.guidance_scale,
            "device": args.device,
            "dtype": args.dtype,
            "batch": args.batch,
            "workers": args.workers,
            "backend": "torch",
        }
        runs = {}
        for name, vae in (("decode", None), ("latents", "none")):
            s = run_sample(SampleConfig(**common, out=str(root / name), vae=vae))
            runs[name] = {k: s[k] for k in ("samples_per_s", "phase2_samples_per_s", "nfe")}
            runs[name] |= {k: s[k] for k in ("decode_fraction", "samples_per_s_without_decode")}
    return {
        "num": args.num,
        "image_size": args.image_size,
        "device": args.device,
        "dtype": args.dtype,
        **runs,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num", type=int, default=512, help="samples per run")
    parser.add_argument("--image-size", type=int, default=32, help="image side S")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=4, help="images per class")
    parser.add_argument("--nfe", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=256, help="samples per model call")
    parser.add_argument("--workers", type=int, default=0, help="Ray sample workers")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="model and VAE dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def cli_main(args: argparse.Namespace) -> int:
    r = run(args)
    print(f"{r['num']} samples of {r['image_size']}² images, {r['device']} {r['dtype']}")
    for name in ("decode", "latents"):
        v = r[name]
        print(
            f"  {name:>8}: {v['samples_per_s']:8.1f} samples/s (NFE {v['nfe']}), decode "
            f"{v['decode_fraction']:.1%} of the workers' time"
        )
    print(f"  estimate without decode: {r['decode']['samples_per_s_without_decode']:.1f}/s")
    if args.json:
        print(json.dumps(r))
    return 0
