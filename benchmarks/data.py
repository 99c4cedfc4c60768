"""Data pipeline throughput: Ray Data over Parquet shards (local and S3 via moto on loopback) vs torchvision
ImageFolder + DataLoader on the same images, same pretrain augment, same number of cores.

    python benchmarks/data.py --images 3000 --cores 2 --input-size 192

A third, reference row runs a DataLoader with the Ray pipeline's own per-image kernels (libjpeg-turbo decode + uint8
tensor resize, 2-3x PIL's speed), so the table separates the kernels' gain from Ray's overhead. The row
"ray data, local, OMP_NUM_THREADS=<cores>" runs the local pipeline with that variable exported to its decode tasks
(as scripts/test.sh and many users do): the tasks size torch's threads from decode_cpus, so it should match the
plain local row (before they did, it fell to 0.53x torchvision).

Images: a generated ImageNet-like ImageFolder (JPEGs of 300-500 px, 10 classes) or --src an existing one.
Both pipelines produce ImageNet-normalised float batches (B, 3, S, S) in this process, as a training loop consumes
them: RandomResizedCrop(S, scale (0.2, 1), bicubic) + horizontal flip. Ray decodes into uint8 and normalises on the
consumer (the device in training); torchvision runs ToTensor + Normalize in its workers. Each pipeline gets one
warm-up epoch (worker start-up), then `--epochs` timed epochs, interleaved so load changes hit all alike; the median
images/s is reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arm_platform.config import DataConfig  # noqa: E402
from arm_platform.data import ingest  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_images(root: str, n: int, classes: int = 10, seed: int = 0) -> None:
    """n ImageNet-like JPEGs (smooth colour fields + texture, 300-500 px sides, q90) in <root>/train/<class>/,
    plus n // 10 in <root>/val/<class>/."""
    rng = np.random.default_rng(seed)
    for i in range(n + n // 10):
        split = "train" if i < n else "val"
        folder = os.path.join(root, split, f"class_{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        w, h = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        low = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        pixels = np.clip(np.asarray(low, dtype=np.int16) + rng.normal(0, 18, size=(h, w, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)


def torchvision_epochs(root: str, cfg: DataConfig, batch_size: int, workers: int) -> Callable[[], int]:
    """One-epoch runner over torchvision ImageFolder + DataLoader; returns the images seen."""
    import torch
    from torchvision import datasets as tvd
    from torchvision import transforms as tvt

    tf = tvt.Compose(
        [
            tvt.RandomResizedCrop(
                cfg.input_size, scale=(cfg.min_crop_scale, 1.0), interpolation=tvt.InterpolationMode.BICUBIC
            ),
            tvt.RandomHorizontalFlip(cfg.hflip),
            tvt.ToTensor(),
            tvt.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    loader = torch.utils.data.DataLoader(
        tvd.ImageFolder(os.path.join(root, "train"), tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        drop_last=False,
    )

    def epoch() -> int:
        return _consume(({"image": x, "label": y} for x, y in loader))

    return epoch


def kernel_loader_epochs(root: str, cfg: DataConfig, batch_size: int, workers: int) -> Callable[[], int]:
    """Reference: DataLoader over the same files with the Ray pipeline's per-image kernels (decode_jpeg + uint8
    tensor resize, normalised in this process). Separates Ray's overhead from the kernels' speed."""
    import torch
    from torchvision import datasets as tvd

    from arm_platform.data.transforms import decode_tensor, image_fn, normalize

    class Files(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.samples = tvd.ImageFolder(os.path.join(root, "train")).samples
            self.fn = image_fn(cfg, "pretrain")

        def __len__(self) -> int:
            return len(self.samples)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            path, label = self.samples[i]
            with open(path, "rb") as f:
                img = decode_tensor(f.read())
            return torch.from_numpy(self.fn(img, np.random.default_rng())), label

    loader = torch.utils.data.DataLoader(
        Files(), batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=True
    )

    def epoch() -> int:
        return _consume(({"image": normalize(x), "label": y} for x, y in loader))

    return epoch


def ray_epochs(data_path: str, cfg: DataConfig, batch_size: int, omp_threads: int | None = None) -> Callable[[], int]:
    """One-epoch runner over the Ray Data pipeline (build_datasets(...)["train"] + iter_batches).

    omp_threads: run the decode tasks with OMP_NUM_THREADS exported to that value (a runtime_env), as when a user or
    scripts/test.sh exports it before `ray.init`: the tasks must still size their threads from decode_cpus.
    """
    from arm_platform.data import datasets

    cfg = dataclasses.replace(cfg, data_path=data_path)
    if omp_threads is None:
        ds = datasets.build_datasets(cfg, "pretrain")["train"]
    else:
        manifest = datasets.read_manifest(data_path)
        raw = datasets.read_shards(manifest.shard_uris("train"), manifest.counts["train"], cfg, shuffle_files=True)
        env = {"env_vars": {"OMP_NUM_THREADS": str(omp_threads)}}
        ds = datasets.decoded(raw, cfg, "pretrain", runtime_env=env)

    def epoch() -> int:
        return _consume(datasets.iter_batches(ds, batch_size, "cpu", drop_last=False))

    return epoch


def _consume(batches: Iterable[dict]) -> int:
    n = 0
    for batch in batches:
        assert batch["image"].dtype.is_floating_point and batch["image"].shape[1] == 3
        n += len(batch["label"])
    return n


def start_moto() -> tuple[object, str]:
    """A moto S3 server on 127.0.0.1 with the standard AWS env vars pointing at it; returns (server, bucket)."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    from arm_platform import storage

    storage.s3_client().create_bucket(Bucket="bench")
    return server, "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--src", help="existing ImageFolder tree with train/ (default: generate --images)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (after one warm-up)")
    parser.add_argument("--shard-size-mb", type=float, default=32.0)
    parser.add_argument("--decode-cpus", type=float, default=0.5, help="Ray CPUs per decode task")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args()

    import ray
    import torch

    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="arm-data-bench-")
    src = args.src
    if src is None:
        src = os.path.join(work, "images")
        t = time.time()
        make_images(src, args.images)
        print(f"generated {args.images} JPEGs in {time.time() - t:.0f}s at {src}")
    cfg = DataConfig(
        input_size=args.input_size,
        min_crop_scale=0.2,
        shard_size_mb=args.shard_size_mb,
        num_parallel=args.cores,
        decode_cpus=args.decode_cpus,
    )
    pipelines: dict[str, Callable[[], int]] = {}
    t = time.time()
    local = os.path.join(work, "shards")
    manifest = ingest.ingest_folder(src, local, cfg)
    print(
        f"ingest local: {manifest.counts['train']} images, {len(manifest.shards['train'])} shards, "
        f"{time.time() - t:.0f}s"
    )
    server = None
    if not args.no_s3:
        server, bucket = start_moto()
        t = time.time()
        ingest.ingest_folder(src, f"s3://{bucket}/shards", cfg)
        print(f"ingest s3 (moto): {time.time() - t:.0f}s")
    from arm_platform.data.datasets import ray_system_config

    ray.init(
        num_cpus=args.cores,
        include_dashboard=False,
        log_to_driver=False,
        # the OMP_NUM_THREADS row's decode tasks run in a second worker pool (their own runtime_env): keep both warm
        _system_config=ray_system_config(cfg, args.cores, train_workers=math.ceil(args.cores / args.decode_cpus)),
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    pipelines["torchvision ImageFolder+DataLoader"] = torchvision_epochs(src, cfg, args.batch_size, args.cores)
    pipelines["reference: DataLoader + ARM kernels"] = kernel_loader_epochs(src, cfg, args.batch_size, args.cores)
    pipelines["ray data, local parquet"] = ray_epochs(local, cfg, args.batch_size)
    omp_row = f"ray data, local, OMP_NUM_THREADS={args.cores}"
    pipelines[omp_row] = ray_epochs(local, cfg, args.batch_size, omp_threads=args.cores)
    if server is not None:
        pipelines["ray data, s3 parquet (moto)"] = ray_epochs(f"s3://{bucket}/shards", cfg, args.batch_size)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for epoch in pipelines.values():  # warm-up: worker processes, imports, caches
        epoch()
    for _ in range(args.epochs):
        for name, epoch in pipelines.items():
            t = time.time()
            n = epoch()
            rates[name].append(n / (time.time() - t))
    ray.shutdown()
    if server is not None:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(rates["torchvision ImageFolder+DataLoader"])
    print(
        f"\n{manifest.counts['train']} images, input {args.input_size}px pretrain augment, {args.cores} cores, "
        f"decode_cpus {args.decode_cpus}, batch {args.batch_size}, median of {args.epochs} epochs"
    )
    print(f"{'pipeline':<38} {'img/s':>8} {'epochs img/s':>24} {'ratio vs torchvision':>22}")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"{name:<38} {med:>8.0f} {', '.join(f'{x:.0f}' for x in r):>24} {med / base:>22.2f}")


if __name__ == "__main__":
    main()
