"""What the eye-from-the-photo check costs per photo: the landmarks alone (format 2) against the landmarks plus the
chirality network (format 3: one network, E12, or several, E13), on the same real photos in the same run, as the
worker calls it (:func:`training.api.predict_laterality` on the preprocessed 512 px square crop).

Photos: srahim and EyePACS (both eyes of several patients), read from ../shared/data; nothing is copied.

    .venv/bin/python benchmarks/bench_laterality.py --old <format-2 file> --new models/laterality.pt [--new <another>]
        [--photos 24] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_dir, machine_info, median, print_header, print_table, write_json
from training.api import load_laterality_model, predict_laterality
from training.data.transforms import crop_square, resize_square


def photos(n: int) -> list[np.ndarray]:
    files = sorted((data_dir("srahim")).glob("*.jpg"))[: n // 2] + sorted((data_dir("eyepacs")).glob("*.jpg"))[: n - n // 2]
    return [resize_square(crop_square(cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)), 512) for f in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", action="append", default=[],
                        help="a format-3 laterality model (repeat to compare several; default models/laterality.pt)")
    parser.add_argument("--old", required=True, help="a format-2 laterality model (the landmarks alone)")
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = machine_info()
    print_header("laterality check per photo", info)
    models = {"format 2 (landmarks)": load_laterality_model(Path(args.old))}
    for path in args.new or ["models/laterality.pt"]:
        model = load_laterality_model(Path(path))
        n = len(model["chirality"].get("members", [None])) if "chirality" in model else 0
        models[f"{model['format']}, {n} network{'s' if n != 1 else ''} ({path})"] = model
    squares = photos(args.photos)
    runs: dict[str, list[float]] = {k: [] for k in models}

    for model in models.values():  # warm-up: the first call builds the network's kernels
        predict_laterality(model, squares[0])
    for _ in range(args.repeats):  # alternate, so a slower minute of the machine hits both
        for name, model in models.items():
            t0 = time.perf_counter()
            for sq in squares:
                predict_laterality(model, sq)
            runs[name].append((time.perf_counter() - t0) / len(squares) * 1000)
    base = median(runs["format 2 (landmarks)"])
    rows = [[name, median(ms), min(ms), max(ms), median(ms) / base] for name, ms in runs.items()]
    print_table(["model", "median ms/photo", "min", "max", "ratio to format 2"], rows)
    write_json(args.json, {"machine": info, "photos": len(squares), "repeats": args.repeats, "ms_per_photo": runs,
                           "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
