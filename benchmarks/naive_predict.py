"""The naive baseline: one fresh Python process per photo (load model, decode at full size, predict, write masks).

    .venv/bin/python benchmarks/naive_predict.py CHECKPOINT IMAGE OUT_DIR

What a one-off script would do: import torch, rebuild the model from the checkpoint, read the whole
file with cv2.imread (no reduced decode), preprocess exactly as training did, one forward, write the
five lesion masks as PNGs. No Grad-CAM, no database, no report.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    checkpoint, image, out_dir = (Path(a) for a in argv)
    import cv2
    import torch

    from training.checkpoint import load_model
    from training.data.transforms import eval_transforms, preprocess_fundus
    from training.model import LESION_CODES

    model, meta = load_model(checkpoint, "cpu")
    size = model.config.image_size
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        print(f"cannot read {image}", file=sys.stderr)
        return 1
    rgb, _ = preprocess_fundus(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), size)
    x = eval_transforms(size)(image=rgb)["image"][None]
    with torch.inference_mode():
        out = model(x)
    masks = (torch.sigmoid(out.seg_logits[0]) > float(meta["thresholds"].get("lesion", 0.5))).numpy()
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, code in enumerate(LESION_CODES):
        cv2.imwrite(str(out_dir / f"{image.stem}_mask_{code}.png"), masks[k].astype("uint8") * 255)
    print(f"{image.name}: DR {int(out.dr_logits.argmax())}, DME {int(out.dme_logits.argmax())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
