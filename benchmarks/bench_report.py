"""PDF report rendering alone: a two-eye visit rendered by WeasyPrint, current templates vs an earlier version.

The worker's drop-to-PDF cost includes one report per visit (in its renderer process); this measures that
report by itself, without the model. The visit is built like the worker builds it: the 512 px fundus crop
(photo.jpg), a lesion overlay and two 256 px heatmaps as JPEGs, from two real photos of one patient
(../shared/data/srahim; synthetic fundus images with --synthetic). Template versions are rendered in turn
(interleaved, so machine noise hits both alike); wall and CPU time per report are medians over the runs.

    .venv/bin/python benchmarks/bench_report.py                       # templates/ only
    .venv/bin/python benchmarks/bench_report.py --baseline-ref 25a60e9 --repeats 15 --json /tmp/br.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, data_dir, machine_info, median, print_header, print_table, write_json

TEMPLATE_FILES = ("report.html.j2", "report.css")


def templates_at(ref: str, dest: Path) -> Path:
    """The report templates as committed at git ``ref``, written to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        res = subprocess.run(["git", "show", f"{ref}:templates/{name}"], cwd=ROOT, capture_output=True)
        if res.returncode != 0:
            sys.exit(f"error: cannot read templates/{name} at git ref {ref!r}: {res.stderr.decode().strip()}")
        (dest / name).write_bytes(res.stdout)
    return dest


def visit_images(folder: Path, synthetic: bool) -> dict[str, dict[str, Path]]:
    """Per eye the four pictures a report embeds, made the way screening.pipeline writes them."""
    import cv2
    import numpy as np

    from screening.explain import cam_overlay, lesion_overlay
    from screening.imaging import decode
    from training.model import LESION_CODES

    if synthetic:
        from training.data.synthetic import make_fundus

        photos = {eye: make_fundus(np.random.default_rng(i), size=512, dr_grade=2, dme_grade=1).image
                  for i, eye in enumerate("RL")}
    else:
        src = data_dir("srahim")
        photos = {eye: decode(src / f"Patient047_{eye}.jpg", 512).display for eye in "RL"}
    out: dict[str, dict[str, Path]] = {}
    rng = np.random.default_rng(0)
    for eye, rgb in photos.items():
        masks = np.zeros((len(LESION_CODES), 512, 512), np.uint8)
        for k in range(len(LESION_CODES)):
            for _ in range(12):
                cv2.circle(masks[k], (int(rng.integers(80, 430)), int(rng.integers(80, 430))), int(rng.integers(3, 12)), 1, -1)
        small = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
        cam = cv2.GaussianBlur(rng.random((256, 256)).astype(np.float32), (0, 0), 25)
        cam = (cam - cam.min()) / max(float(np.ptp(cam)), 1e-6)
        pictures = {"photo": rgb, "overlay": lesion_overlay(rgb, masks, LESION_CODES),
                    "dr_cam": cam_overlay(small, cam), "dme_cam": cam_overlay(small, cam[::-1])}
        out[eye] = {}
        for name, img in pictures.items():
            path = folder / f"{eye}_{name}.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            out[eye][name] = path
    return out


def visit_context(images: dict[str, dict[str, Path]]):
    from screening.report import EyeFinding, ReportContext

    def eye(code: str, dr: int, dme: int) -> EyeFinding:
        dr_probs, dme_probs = [0.01] * 5, [0.02] * 3
        dr_probs[dr], dme_probs[dme] = 0.96, 0.96
        p = images[code]
        return EyeFinding(
            eye=code, source_name=f"Patient047_{code}.jpg", photo_path=p["photo"], overlay_path=p["overlay"],
            dr_cam_path=p["dr_cam"], dme_cam_path=p["dme_cam"], dr_grade=dr, dr_probs=dr_probs, dme_grade=dme,
            dme_probs=dme_probs, referable_score=0.97, referable=True,
            lesion_areas={"MA": 0.0004, "HE": 0.0199, "EX": 0.0159, "SE": 0.0, "OD": 0.0375},
        )

    metrics = {"Validation DR kappa": 0.519, "Validation referable-DR AUC": 0.915, "Validation mean lesion AUPR": 0.447,
               "Test referable AUC": 0.914, "Test sensitivity": 0.87, "Test specificity": 0.727, "Test DR kappa": 0.562,
               "Test OD Dice": 0.937, "Test referable AUC 95% CI": "0.84-0.97", "Referral threshold": 0.422,
               "Grades from": "lesion-evidence regression"}
    return ReportContext(
        clinic_name="Diabetic Eye Screening Service", patient_id="Patient047", exam_date=date(2026, 11, 25),
        eyes=[eye("R", 4, 2), eye("L", 3, 2)], model_version="drnet-resnet18-512-real-202611251714+lesion-seg-lr",
        checkpoint_sha256="851b15e68442" + "0" * 52, model_status="research", model_metrics=metrics,
        generated_at=datetime(2026, 11, 25, 21, 59, tzinfo=timezone.utc), report_version=1,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", help="also render the templates committed at this git ref (e.g. a commit id)")
    ap.add_argument("--repeats", type=int, default=12, help="timed renders per template version (default 12)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic fundus images instead of ../shared/data")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args()

    from weasyprint import HTML

    from screening.legend import LESION_COLOURS_RGB
    from screening.report import LESION_LABELS, TEMPLATE_NAME, _environment, _stylesheet, local_fetcher, template_variables

    info = machine_info()
    print_header("PDF report rendering (WeasyPrint), two-eye visit", info)
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        tmp_path = Path(tmp)
        ctx = visit_context(visit_images(tmp_path, args.synthetic))
        versions = {"templates/ (working tree)": ROOT / "templates"}
        if args.baseline_ref:
            versions[f"templates/ at {args.baseline_ref}"] = templates_at(args.baseline_ref, tmp_path / "baseline")
        jobs = {}
        for label, folder in versions.items():
            folder = folder.resolve()
            variables = template_variables(ctx, folder, link_stylesheet=False)
            # earlier templates drew a separate overlay legend from this list
            variables["lesion_legend"] = [{"code": c, "label": LESION_LABELS[c], "colour": "#{:02x}{:02x}{:02x}".format(*rgb)}
                                          for c, rgb in LESION_COLOURS_RGB.items()]
            # the same Jinja2 environment and parsed stylesheet that screening.report.render_pdf uses
            st = (folder / "report.css").stat()
            css, fonts = _stylesheet(folder / "report.css", (st.st_mtime_ns, st.st_size))
            html = _environment(folder).get_template(TEMPLATE_NAME).render(**variables)
            jobs[label] = (html, folder, css, fonts)
        wall: dict[str, list[float]] = {k: [] for k in jobs}
        cpu: dict[str, list[float]] = {k: [] for k in jobs}
        pages: dict[str, int] = {}
        for i in range(args.repeats + 1):  # the first round warms up (fonts, image decoders)
            for label, (html, folder, css, fonts) in jobs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                doc = HTML(string=html, base_url=str(folder), url_fetcher=local_fetcher()).render(stylesheets=[css],
                                                                                                 font_config=fonts)
                pdf = doc.write_pdf()
                if i:
                    wall[label].append(time.perf_counter() - t0)
                    cpu[label].append(time.process_time() - c0)
                pages[label] = len(doc.pages)
                assert pdf.startswith(b"%PDF")
    rows = []
    base_label = next(iter(jobs))
    results = {}
    for label in jobs:
        w, c = median(wall[label]) * 1000, median(cpu[label]) * 1000
        results[label] = {"wall_ms_median": round(w, 1), "cpu_ms_median": round(c, 1), "wall_ms_min": round(min(wall[label]) * 1000, 1),
                          "pages": pages[label], "wall_ms_runs": [round(x * 1000, 1) for x in wall[label]]}
        rows.append([label, w, c, min(wall[label]) * 1000, pages[label]])
    print(f"\n{args.repeats} renders per version, interleaved; {'synthetic' if args.synthetic else 'real'} photos")
    print_table(["templates", "wall ms (median)", "CPU ms (median)", "wall ms (min)", "pages"], rows)
    if args.baseline_ref:
        other = [k for k in jobs if k != base_label][0]
        ratio = results[base_label]["cpu_ms_median"] / results[other]["cpu_ms_median"]
        print(f"working tree / baseline, CPU time: {ratio:.2f}x")
        results["cpu_ratio_vs_baseline"] = round(ratio, 3)
    write_json(args.json, {"machine": info, "repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
