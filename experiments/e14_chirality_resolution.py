"""E14: E12's chirality network fine-tuned at a higher resolution (experiments/README.md, E14).

    .venv/bin/python experiments/e14_chirality_resolution.py [--epochs 4] [--store 320] [--crop 280]

Reads the same photos as `dr-train fit-laterality` (experiments/quality.toml; E12's upright sources) and starts from
E12's run checkpoint in .cache/laterality/. Checkpointed every epoch (resumed exactly: training.chirality's loop).
Prints the network alone and joined with the landmarks on the validation split; the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.chirality import ChiralityNet, chirality_logits, train_epoch  # noqa: E402
from training.common import atomic_write, atomic_write_text  # noqa: E402
from training.config import load_training_config  # noqa: E402
from training.data.sources import load_all  # noqa: E402
from training.data.split import configured_split  # noqa: E402
from training.fit_laterality import _probabilities, fit_weights, measure_records, pseudo_labelled, stored_photos  # noqa: E402
from training.laterality import load_laterality_model, log_odds  # noqa: E402

UPRIGHT = ("idrid-grading", "idrid-segmentation", "manifest:idrid-nar", "manifest:messidor2")
E12_RUN = ROOT / ".cache" / "laterality" / "chirality-run-b7e3562f08c72a2b.pt"


def joined(p_l: np.ndarray, cnn: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The landmarks and the network joined as `fit-laterality` joins them (weights fitted here, on validation):
    photos right and the log-loss of the stated eyes (E13's measures)."""
    a, b = fit_weights(p_l, cnn, y)
    p = 1 / (1 + np.exp(-(a * log_odds(p_l) + b * cnn)))
    pc = np.clip(p, 1e-6, 1 - 1e-6)
    return {"weights": [a, b], "right": int(((p >= 0.5) == (y > 0)).sum()),
            "log_loss": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc)))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--store", type=int, default=320)
    ap.add_argument("--crop", type=int, default=280)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--out", default=str(ROOT / "runs" / "laterality-e14"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_training_config(ROOT / "experiments" / "quality.toml")
    split = configured_split(cfg.data, load_all(cfg.data))
    cache = Path(cfg.data.cache_dir).parent / "laterality" / "landmarks.npz"
    named = {s: [r for r in split[s] if r.eye in ("L", "R")] for s in ("train", "val")}
    pseudo, pseudo_y = pseudo_labelled([*split["train"], *split["val"]], UPRIGHT, cache)
    records = [*named["train"], *pseudo]
    labels = np.r_[np.array([r.eye == "R" for r in named["train"]], np.float32), pseudo_y].astype(np.float32)
    y_val = np.array([r.eye == "R" for r in named["val"]], float)
    print(f"{len(named['train'])} named + {len(pseudo)} upright training photos, {len(named['val'])} validation", flush=True)
    photos = stored_photos(records, cache.parent, args.store)
    val_photos = stored_photos(named["val"], cache.parent, args.store)
    model = load_laterality_model(ROOT / "models" / "laterality.pt")
    p_l = _probabilities(model, measure_records(named["val"], cache), "detect")

    torch.manual_seed(14)
    net = ChiralityNet("resnet18")
    net.load_state_dict(torch.load(E12_RUN, map_location="cpu", weights_only=True)["model"])
    batch = 32
    opt = torch.optim.AdamW([{"params": net.encoder.parameters(), "lr": args.lr},
                             {"params": net.head.parameters(), "lr": args.lr * 10}], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[args.lr, args.lr * 10],
                                                total_steps=args.epochs * (len(photos) // batch), pct_start=0.2)
    rng = np.random.default_rng(14)
    ckpt = out / "run.pt"
    start, history = 0, []
    if ckpt.is_file():
        s = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        rng.bit_generator.state = s["rng"]
        torch.set_rng_state(s["torch_rng"])
        start, history = s["epoch"], s["history"]
    else:
        base = chirality_logits(net, val_photos, crop=args.crop)
        history.append({"epoch": 0, "alone": float(((base > 0) == (y_val > 0)).mean()), **joined(p_l, base, y_val)})
        print(json.dumps(history[-1]), flush=True)
    for epoch in range(start, args.epochs):
        loss = train_epoch(net, photos, labels, opt, sched, rng, batch, args.crop)
        logits = chirality_logits(net, val_photos, crop=args.crop)
        np.save(out / f"val-logits-epoch{epoch + 1}.npy", logits)
        history.append({"epoch": epoch + 1, "loss": loss, "alone": float(((logits > 0) == (y_val > 0)).mean()),
                        **joined(p_l, logits, y_val)})
        state = {"epoch": epoch + 1, "model": net.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "history": history}
        atomic_write(ckpt, lambda tmp, state=state: torch.save(state, tmp))
        print(json.dumps(history[-1]), flush=True)
    atomic_write_text(out / "history.json", json.dumps(history, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
