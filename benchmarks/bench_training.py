"""Training and evaluation throughput (images/second) of the multi-task network on this machine.

For each image size: a training step (forward + MultiTaskLoss + backward + Adam step) and an evaluation
forward (``torch.inference_mode``), random-initialised model, synthetic tensors; optionally (default on,
``--no-dataset`` to skip) the same through ``FundusDataset`` + ``DataLoader`` on real srahim images
(preprocessed into a temporary cache first, so the cache build is not timed).

    .venv/bin/python benchmarks/bench_training.py                      # resnet34, 256 and 512 px, batch 4
    .venv/bin/python benchmarks/bench_training.py --backbone resnet18 --sizes 256 --batch-size 8
    .venv/bin/python benchmarks/bench_training.py --quick --json /tmp/bt.json
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine_info, median, print_header, print_table, timed, write_json


def synthetic_batch(n: int, size: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, size, size, generator=g),
        "masks": (torch.rand(n, 5, size, size, generator=g) > 0.97).float(),
        "dr": torch.randint(0, 5, (n,), generator=g),
        "dme": torch.randint(0, 3, (n,), generator=g),
        "has_masks": torch.ones(n, dtype=torch.bool),
    }


def make_steps(model, loss_fn, opt):
    import torch

    def train_step(batch):
        model.train()
        out = model(batch["image"])
        parts = loss_fn(out, batch)
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()

    def eval_step(batch):
        model.eval()
        with torch.inference_mode():
            model(batch["image"])

    return train_step, eval_step


def dataset_batches(size: int, batch_size: int, n_batches: int, cache_dir: Path, train: bool):
    """``n_batches`` batches from FundusDataset over real srahim images (cache built before timing)."""
    from torch.utils.data import DataLoader

    from training.data.cache import build_cache
    from training.data.dataset import FundusDataset
    from training.data.records import Record
    from training.data.transforms import eval_transforms, train_transforms

    files = sorted(data_dir("srahim").glob("*.jpg"))[: batch_size * n_batches]
    if len(files) < batch_size * n_batches:
        sys.exit(f"error: need {batch_size * n_batches} srahim images, found {len(files)}")
    records = [Record(image=f, patient_id=f.stem.split("_")[0], source="srahim", eye=f.stem[-1], dr_grade=i % 5, dme_grade=0)
               for i, f in enumerate(files)]
    build_cache(records, size, cache_dir, progress=False)
    ds = FundusDataset(records, size, cache_dir, train_transforms(size) if train else eval_transforms(size))
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet34", choices=["resnet18", "resnet34", "resnet50"])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7, help="timed iterations per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--no-dataset", action="store_true", help="skip the FundusDataset/DataLoader path on real images")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 and 128 px, batch 2, 2 repeats, 1 warm-up")
    p.add_argument("--json", help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_size, args.repeats, args.warmup = [64, 128], 2, 2, 1

    import torch

    from training.losses import MultiTaskLoss
    from training.model import ModelConfig, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine_info()
    print_header(f"training/eval throughput, {args.backbone}, batch {args.batch_size}", info)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for size in args.sizes:
            model = build_model(ModelConfig(backbone=args.backbone, image_size=size))
            loss_fn = MultiTaskLoss()
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            train_step, eval_step = make_steps(model, loss_fn, opt)
            batch = synthetic_batch(args.batch_size, size)
            t_train = timed(functools.partial(train_step, batch), args.repeats, args.warmup)
            t_eval = timed(functools.partial(eval_step, batch), args.repeats, args.warmup)
            entry = {"size": size, "path": "synthetic", "train_s_per_batch": t_train, "eval_s_per_batch": t_eval,
                     "train_img_per_s": args.batch_size / median(t_train), "eval_img_per_s": args.batch_size / median(t_eval)}
            results.append(entry)
            if not args.no_dataset:
                n = args.warmup + args.repeats
                for train in (True, False):
                    loader = dataset_batches(size, args.batch_size, n, Path(tmp) / "cache", train)
                    times = []
                    it = iter(loader)
                    for i in range(n):  # each iteration: load+augment a batch, then the step (as the real loop does)
                        t0 = time.perf_counter()
                        b = next(it)
                        (train_step if train else eval_step)(b)
                        if i >= args.warmup:
                            times.append(time.perf_counter() - t0)
                    key = "train" if train else "eval"
                    entry[f"dataset_{key}_s_per_batch"] = times
                    entry[f"dataset_{key}_img_per_s"] = args.batch_size / median(times)
            rows.append([size, f"{median(t_train) * 1000:.0f}", f"{entry['train_img_per_s']:.2f}",
                         f"{median(t_eval) * 1000:.0f}", f"{entry['eval_img_per_s']:.2f}",
                         f"{median(t_train) / median(t_eval):.2f}",
                         f"{entry.get('dataset_train_img_per_s', float('nan')):.2f}",
                         f"{entry.get('dataset_eval_img_per_s', float('nan')):.2f}"])
    print(f"median of {args.repeats} timed iterations after {args.warmup} warm-up; random-init model; Adam step")
    print_table(["px", "train ms/batch", "train img/s", "eval ms/batch", "eval img/s", "train/eval",
                 "dataset train img/s", "dataset eval img/s"], rows)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"ratio {b['size']}px vs {a['size']}px: train {a['train_img_per_s'] / b['train_img_per_s']:.2f}x slower, "
              f"eval {a['eval_img_per_s'] / b['eval_img_per_s']:.2f}x slower (pixels {(b['size'] / a['size']) ** 2:.0f}x)")
    write_json(args.json, {"machine": info, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
