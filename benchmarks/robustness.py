"""Robustness run: the worker against hostile input, kill -9 at random moments, a full archive, a second worker.

Repeatable (seeded); everything happens in a temporary folder with its own config, through the real CLI
(``python -m screening.cli``) in child processes, on the shipped model unless ``--checkpoint`` says otherwise.

1. **Bad input**: one file (or entry) of each kind below is dropped into the inbox together with good photos;
   one ``run --once`` (plus one after the files that wait on purpose have aged) must give each the expected
   outcome and code, move nothing it should not, follow no link, and the audit must count every drop once.
2. **kill -9**: a batch of good photos; the worker is started and killed at a random moment, again and again,
   then run to the end. Every photo must be graded exactly once, archived with the SHA-256 the database holds,
   reported in a valid PDF that the database records, and nothing may be left in the inbox: files lost = 0.
3. **Faults**: the archive on a full 1 MB tmpfs (root only), then room again; a second worker on the same
   inbox and database.

    python benchmarks/robustness.py                      # shipped model, 20 photos, 12 kills
    python benchmarks/robustness.py --photos 40 --kills 36 --json benchmarks/results/robustness.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, machine_info, print_header
from training.data.synthetic import make_fundus

GOOD = "graded"
PAGES = "pages graded {graded}, ungradable {ungradable}, refused {refused}"  # a multi-page file: what became of its pages
LONG = "B41scan_" + "x" * 238 + ".jpg"


def fundus_jpeg(seed: int, size: int = 512) -> bytes:
    img = make_fundus(np.random.default_rng(seed), size=size).image
    ok, enc = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return enc.tobytes()


def encoded(ext: str, img: np.ndarray) -> bytes:
    ok, enc = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return enc.tobytes()


def png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int, seed: int) -> bytes:
    data = bytearray(fundus_jpeg(seed, 256))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def tiff(pages: list[tuple[int, int]], seed: int) -> bytes:
    from PIL import Image, TiffImagePlugin

    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf) as tf:
        for size, subfile in pages:
            img = make_fundus(np.random.default_rng(seed), size=size).image
            Image.fromarray(img).save(tf, "TIFF", tiffinfo={254: subfile})
            tf.newFrame()
    return buf.getvalue()


def tiff_of(pictures: list[np.ndarray]) -> bytes:
    """A multi-page TIFF, one full-size page per picture."""
    from PIL import Image, TiffImagePlugin

    buf = io.BytesIO()
    with TiffImagePlugin.AppendingTiffWriter(buf) as tf:
        for img in pictures:
            Image.fromarray(img).save(tf, "TIFF")
            tf.newFrame()
    return buf.getvalue()


def dicom(seed: int, rows: int | None = None, columns: int | None = None) -> bytes:
    """An uncompressed Ophthalmic Photography DICOM of a synthetic photo (patient D<seed>, right eye); ``rows`` and
    ``columns`` overwrite the size its header declares (a decompression bomb claims a huge one)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = make_fundus(np.random.default_rng(seed), size=256).image
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OP"
    ds.PatientID, ds.ImageLaterality, ds.AcquisitionDateTime = f"D{seed}", "R", "20250301101500"
    ds.Rows, ds.Columns = rows or 256, columns or 256
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(img).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def aged(path: Path, seconds: float = 7200) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)


# ------------------------------------------------------------------------------------------- bad input kinds

Kind = tuple[str, Callable[[Path, int], None], str]  # name in the inbox, how to make it, expected outcome/code


def kinds(outside: Path) -> list[Kind]:
    """Each kind: the entry's name, how it is made, and what must become of it (``graded``, ``duplicate`` or a
    rejection code). Seeds keep every photo's bytes distinct unless a kind wants them equal."""
    def write(data: Callable[[int], bytes]) -> Callable[[Path, int], None]:
        return lambda p, seed: p.write_bytes(data(seed))

    def then_age(make: Callable[[Path, int], None]) -> Callable[[Path, int], None]:
        return lambda p, seed: (make(p, seed), aged(p))

    secret = outside / "secret.txt"
    secret.write_text("never read by the worker")
    elsewhere = outside / "elsewhere.jpg"
    elsewhere.write_bytes(fundus_jpeg(999))
    dark = np.zeros((400, 400, 3), np.uint8)
    white = np.full((400, 400, 3), 255, np.uint8)
    blue = np.dstack([np.full((400, 400), v, np.uint8) for v in (40, 90, 200)])
    disc = np.zeros((400, 400, 3), np.uint8)
    cv2.circle(disc, (200, 200), 150, (200, 40, 20), -1)  # a red disc on black: the gradability model refuses it
    return [
        ("B01_R.jpg", write(lambda s: fundus_jpeg(s)), GOOD),
        ("B02_L.jpg", write(lambda s: fundus_jpeg(s)[: len(fundus_jpeg(s)) * 3 // 10]), "incomplete"),
        ("B03_R.jpg", write(lambda s: fundus_jpeg(s)[: len(fundus_jpeg(s)) * 3 // 10] + b"\xff\xd9"), "incomplete"),
        ("B04_R.jpg", write(lambda s: (d := fundus_jpeg(s))[:3000] + bytes(len(d) - 3000)), "incomplete"),
        ("B05_R.jpg", write(lambda s: (d := fundus_jpeg(s))[:4000] + b"\x55" * 500 + d[4500:]), "incomplete"),
        ("B06_R.png", write(lambda s: encoded(".png", make_fundus(np.random.default_rng(s), size=300).image)[:-12]), "incomplete"),
        ("B07_R.png", write(lambda s: (d := encoded(".png", make_fundus(np.random.default_rng(s), size=300).image))[:70]
                            + bytes([d[70] ^ 0xFF]) + d[71:]), "incomplete"),
        ("B08_R.bmp", write(lambda s: (d := encoded(".bmp", make_fundus(np.random.default_rng(s), size=300).image))[: len(d) // 2]),
         "incomplete"),
        ("B09_R.tif", write(lambda s: (d := tiff([(300, 0)], s))[: len(d) - 300]), "incomplete"),
        ("B10_R.jpg", write(lambda s: b""), "empty"),
        ("B11_R.jpg", write(lambda s: b"this is not a picture"), "unreadable"),
        ("B12_R.jpg", write(lambda s: b"GIF89a" + bytes(100)), "unreadable"),
        ("B13_R.pdf", write(lambda s: b"%PDF-1.4"), "unsupported_type"),
        ("B14_R", write(lambda s: fundus_jpeg(s)), "unsupported_type"),
        ("B15_R.png", write(lambda s: png_claiming(30000, 30000)), "too_large"),
        ("B16_R.png", write(lambda s: png_claiming(13000, 13000)), "too_large"),
        ("B17_R.jpg", write(lambda s: jpeg_claiming(20000, 15000, s)), "too_large"),
        ("B18_R.jpg", write(lambda s: fundus_jpeg(s) + os.urandom(9 * 2**20)), "too_large"),  # over max_file_bytes
        ("B19_R.tif", write(lambda s: tiff_of([make_fundus(np.random.default_rng(s + k), size=300).image for k in (0, 1)])),
         PAGES.format(graded=2, ungradable=0, refused=0)),  # two photos in one TIFF: one result each
        ("B20_R.tif", write(lambda s: tiff([(300, 0)] + [(64, 1)] * 5, s)), "multi_page"),
        ("B21_R.tif", write(lambda s: tiff([(64, 1), (400, 0)], s)), GOOD),  # thumbnail first, then the photo
        ("passwd_R.jpg", lambda p, s: p.symlink_to(secret), "not_a_file"),
        ("B22_R.jpg", lambda p, s: p.symlink_to(elsewhere), "not_a_file"),
        ("B23_folder", lambda p, s: (p.mkdir(), (p / "B23_R.jpg").write_bytes(fundus_jpeg(s))), "not_a_file"),
        ("B24_R.jpg", lambda p, s: os.mkfifo(p), "not_a_file"),
        ("..B25_R.jpg", then_age(write(lambda s: fundus_jpeg(s))), "left_behind"),
        ("B26_R.jpg.part", then_age(write(lambda s: fundus_jpeg(s))), "left_behind"),
        ("B27_R.json", then_age(write(lambda s: b'{"patient_id": "B27"}')), "left_behind"),
        ("~$B28_R.jpg", then_age(write(lambda s: fundus_jpeg(s))), "left_behind"),
        ("holiday.jpg", write(lambda s: fundus_jpeg(s)), "identity"),
        ("B29_R_29990101.jpg", write(lambda s: fundus_jpeg(s)), "identity"),  # in the future
        ("B30_R_20251332.jpg", write(lambda s: fundus_jpeg(s)), "identity"),  # not a real date
        ("B31_R_\u0662\u0660\u0662\u0665\u0661\u0661\u0662\u0660.jpg", write(lambda s: fundus_jpeg(s)), "identity"),
        ("<img src=x onerror=alert(1)>_R.jpg", write(lambda s: fundus_jpeg(s)), "identity"),
        ("B32 ; rm -rf _R.jpg", write(lambda s: fundus_jpeg(s)), "identity"),
        ("B33_X.jpg", write(lambda s: fundus_jpeg(s)), "identity"),  # no such eye
        ("scan34.jpg", write(lambda s: fundus_jpeg(s)), "identity"),  # with a bad sidecar (made below)
        ("scan35.jpg", write(lambda s: fundus_jpeg(s)), "identity"),  # sidecar with a path in the patient id
        ("B36_R.jpg", write(lambda s: cv2.imencode(".jpg", dark)[1].tobytes()), "not_fundus"),  # nothing lit: no fundus
        ("B37_R.png", write(lambda s: encoded(".png", white)), "not_fundus"),
        ("B38_R.png", write(lambda s: encoded(".png", blue)), "not_fundus"),
        ("B39_R.png", write(lambda s: encoded(".png", np.full((60, 60, 3), 120, np.uint8))), "too_small"),
        ("B40_R.png", write(lambda s: encoded(".png", disc)), "not_fundus"),
        (LONG, write(lambda s: fundus_jpeg(s)), GOOD),  # a 250-character name (identity from its sidecar)
        ("Patient143_L.jpg", write(lambda s: fundus_jpeg(s)), GOOD),
        ("patient143_r.JPG", write(lambda s: fundus_jpeg(s)), GOOD),  # the same patient, other case
        ("B42_R.jpg", write(lambda s: fundus_jpeg(4242)), GOOD),
        ("B42_R_copy.jpg", write(lambda s: fundus_jpeg(4242)), "duplicate"),  # same bytes, same patient (by name)
        ("b42_r_20250101.jpg", write(lambda s: fundus_jpeg(4242)), "duplicate"),  # same bytes, case and date differ
        ("B43_R.jpg", write(lambda s: fundus_jpeg(4242)), "identity_conflict"),  # same bytes, another patient
        ("B42_L.jpg", write(lambda s: fundus_jpeg(4242)), "identity_conflict"),  # same bytes, the other eye
        ("B45_R.tif", write(lambda s: tiff_of([make_fundus(np.random.default_rng(s), size=300).image, white,
                                               make_fundus(np.random.default_rng(s + 1), size=300).image])),
         PAGES.format(graded=2, ungradable=0, refused=1)),  # two photos and a scanned form
        ("B46_R.tif", write(lambda s: tiff_of([white, blue])), "not_fundus"),  # no photo on any page: refused whole
        ("B47_R.tif", write(lambda s: tiff_of([make_fundus(np.random.default_rng(100), size=300).image, cv2.GaussianBlur(
            make_fundus(np.random.default_rng(101), size=300).image, (0, 0), 6)])),
         PAGES.format(graded=1, ungradable=1, refused=0)),  # a sharp photo and a blurred one: each page judged alone
        ("B48.tif", write(lambda s: tiff_of([make_fundus(np.random.default_rng(1), size=400, eye="L", dr_grade=0).image,
                                             make_fundus(np.random.default_rng(2), size=400, eye="R", dr_grade=0).image])),
         PAGES.format(graded=2, ungradable=0, refused=0)),  # no eye in the name: each page takes the eye it shows
        ("IM000047", write(lambda s: dicom(s)), GOOD),  # a PACS export without a suffix
        ("IM000048", write(lambda s: dicom(s, 30000, 30000)), "too_large"),  # Rows x Columns of a bomb, from the header
        ("B44_R.png", write(lambda s: cv2.imencode(".png", cv2.cvtColor(
            (make_fundus(np.random.default_rng(s), size=300).image.astype(np.uint16) * 257), cv2.COLOR_RGB2BGR))[1].tobytes()), GOOD),
    ]


# --------------------------------------------------------------------------------------------------- running

def config(folder: Path, checkpoint: Path, **extra: Any) -> Path:
    cfg = folder / "config.toml"
    lines = ["[screening]", f"inbox = '{folder / 'inbox'}'", f"reports = '{folder / 'reports'}'",
             f"archive = '{folder / 'archive'}'", f"rejected = '{folder / 'rejected'}'", f"work_dir = '{folder / 'work'}'",
             f"database = 'sqlite:///{folder / 'screening.db'}'", f"checkpoint = '{checkpoint}'", "stable_seconds = 0.2",
             f"quality_model = '{ROOT / 'models' / 'quality.pt'}'", f"laterality_model = '{ROOT / 'models' / 'laterality.pt'}'",
             "threads = 2", "device = 'cpu'", "max_file_bytes = 8388608", "incomplete_grace = 300.0",
             "abandoned_after = 3600.0", "batch_size = 1"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    cfg.write_text("\n".join(lines) + "\n")
    for sub in ("inbox", "reports", "archive", "rejected", "work"):
        (folder / sub).mkdir(exist_ok=True)
    return cfg


def cli(cfg: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "screening.cli", "--config", str(cfg), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def query(folder: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{folder / 'screening.db'}?mode=ro", uri=True) as db:
        return db.execute(sql, params).fetchall()


def bad_input(folder: Path, checkpoint: Path) -> dict[str, Any]:
    cfg = config(folder, checkpoint)
    inbox = folder / "inbox"
    outside = folder / "outside"
    outside.mkdir()
    table = kinds(outside)
    for i, (name, make, _) in enumerate(table):
        make(inbox / name, 100 + i)
    aged(inbox / "B42_R.jpg", 300)  # the first of the same bytes to arrive: the others are its copies
    (inbox / (LONG[:-4] + ".json")).write_text(json.dumps({"patient_id": "B41", "eye": "R"}))
    (inbox / "scan34.json").write_text("{ not json")
    (inbox / "scan35.json").write_text(json.dumps({"patient_id": "../../etc", "eye": "R"}))
    (inbox / ".gitkeep").touch()  # the inbox's own placeholder, old: left alone, never recorded
    aged(inbox / ".gitkeep")
    secret_before = (outside / "secret.txt").read_text()
    t0 = time.monotonic()
    first = cli(cfg, "run", "--once")
    seconds = time.monotonic() - t0
    # incomplete files wait (they may still be being copied): the same files once the grace has passed
    deferred = sorted(p.name for p in inbox.iterdir() if p.name != ".gitkeep")
    for name in deferred:
        aged(inbox / name, 400)
    second = cli(cfg, "run", "--once")
    outcomes = dict(query(folder, "SELECT source_name, coalesce(reason_code, outcome) FROM drops"))
    graded = {n for (n,) in query(folder, "SELECT i.source_name FROM images i JOIN results r ON r.image_id = i.id")}
    ungradable = {n for (n,) in query(folder, "SELECT source_name FROM images WHERE gradable = 0 AND state IN ('done', 'reported')")}
    pages: dict[str, dict[str, int]] = {}
    for name, state, has_result in query(folder, "SELECT i.source_name, i.state, r.id IS NOT NULL FROM images i "
                                                 "LEFT JOIN results r ON r.image_id = i.id WHERE i.page IS NOT NULL"):
        counts = pages.setdefault(name.rsplit(" (page ", 1)[0], {"graded": 0, "ungradable": 0, "refused": 0, "unfinished": 0})
        stored = state in ("done", "reported")
        counts["graded" if stored and has_result else "ungradable" if stored else "refused" if state == "rejected"
               else "unfinished"] += 1
    got: dict[str, str] = {}
    for name, _, _ in table:
        if name in graded:
            got[name] = GOOD
        elif name in pages:
            got[name] = PAGES.format(**pages[name]) + (f", unfinished {n}" if (n := pages[name]["unfinished"]) else "")
        elif name in ungradable:  # stored without a grade by the intake checks (issue 13)
            got[name] = "ungradable"
        else:
            got[name] = outcomes.get(name, "(nothing recorded)")
    wrong = {name: (expected, got[name]) for name, _, expected in table if got[name] != expected}
    left = sorted(p.name for p in inbox.iterdir() if p.name != ".gitkeep")
    drops = query(folder, "SELECT count(*) FROM drops")[0][0]
    audit = cli(cfg, "audit", "--json", str(folder / "audit.json"))
    summary = json.loads((folder / "audit.json").read_text())
    long_name = next((p.name for p in (folder / "archive").rglob("*B41scan_*") if not p.name.endswith(".json")),
                     "(not archived)")
    return {
        "kinds": len(table), "kinds_checked": len(table), "wrong": wrong, "left_in_inbox": left,
        "deferred_by_the_first_run": deferred, "exit_codes": [first.returncode, second.returncode],
        "traceback": "Traceback" in first.stderr + second.stderr, "first_run_s": round(seconds, 1),
        "drops_recorded": drops, "audit_drops": summary["drops"], "audit_rejected": summary["rejected_reasons"],
        "audit_counts_every_drop_once": sum(summary["drops"].values()) == drops and audit.returncode == 0,
        "link_target_untouched": (outside / "secret.txt").read_text() == secret_before and (outside / "elsewhere.jpg").is_file(),
        "long_name_keeps_extension": long_name.endswith(".jpg"),
        "red_disc_on_black": got["B40_R.png"],
        "patients_143": [c for (c,) in query(folder, "SELECT code FROM patients WHERE lower(code) = 'patient143'")],
        "placeholder_left_alone": (inbox / ".gitkeep").is_file() and not query(
            folder, "SELECT count(*) FROM drops WHERE source_name = '.gitkeep'")[0][0],
        "eyes_of_the_pages_of_B48": [f"{eye} ({source})" for eye, source in query(
            folder, "SELECT eye, eye_source FROM images WHERE source_name LIKE 'B48.tif (page %' ORDER BY page")],
        "multi_page_files_archived_once": sorted(p.name.split("_", 1)[1] for p in (folder / "archive").rglob("*.tif")
                                                 if "duplicates" not in p.parts),
    }


def killed_restarts(folder: Path, checkpoint: Path, photos: int, kills: int, seed: int) -> dict[str, Any]:
    cfg = config(folder, checkpoint)
    inbox = folder / "inbox"
    rng = random.Random(seed)
    sources: dict[str, str] = {}
    for i in range(photos):
        name = f"K{i // 2:03d}_{'RL'[i % 2]}.jpg"
        data = fundus_jpeg(5000 + i)
        (inbox / name).write_bytes(data)
        sources[name] = hashlib.sha256(data).hexdigest()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done_kills = 0
    while done_kills < kills and any(inbox.iterdir()):
        proc = subprocess.Popen([sys.executable, "-m", "screening.cli", "--config", str(cfg), "run", "--once"], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 8.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done_kills += 1
        proc.wait()
    final = cli(cfg, "run", "--once")
    archived = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in (folder / "archive").rglob("*.jpg")}
    lost = [name for name, sha in sources.items() if sha not in archived]
    rows = query(folder, "SELECT i.sha256, i.state, i.stored_path, count(r.id) FROM images i LEFT JOIN results r "
                         "ON r.image_id = i.id GROUP BY i.id")
    db_ok = all(state == "reported" and n == 1 and stored and Path(stored).is_file()
                and hashlib.sha256(Path(stored).read_bytes()).hexdigest() == sha for sha, state, stored, n in rows)
    recorded = {Path(p).resolve() for (p,) in query(folder, "SELECT path FROM reports")}
    pdfs = sorted((folder / "reports").rglob("report_v*.pdf"))
    from pypdf import PdfReader

    valid = sum(1 for p in pdfs if len(PdfReader(str(p)).pages) >= 1)
    integrity = query(folder, "PRAGMA integrity_check")[0][0]
    return {
        "photos": photos, "kills": done_kills, "final_exit_code": final.returncode, "files_lost": len(lost),
        "results": sum(n for *_, n in rows), "graded_once_archived_same_sha": db_ok and len(rows) == photos,
        "left_in_inbox": len(list(inbox.iterdir())), "pdfs": len(pdfs), "pdfs_valid": valid,
        "pdfs_unrecorded": len([p for p in pdfs if p.resolve() not in recorded]), "integrity": integrity,
        "orphans_removed": query(folder, "SELECT count(*) FROM events WHERE code = 'orphan_report_removed'")[0][0],
        "partial_copies_removed": query(folder, "SELECT count(*) FROM events WHERE code = 'partial_copy_removed'")[0][0],
    }


def restored_in_place(folder: Path, cfg: Path, env: dict[str, str]) -> dict[str, Any]:
    """A watching worker whose database file is overwritten in place with another database (SQLite's backup API:
    same file, same inode) must stop (exit 3) before it records anything into the other one."""
    inbox = folder / "inbox"
    other = folder / "other"
    other.mkdir()
    made = cli(config(other, Path(str(cfg)).parent / "unused.pt"), "init-db")
    watcher = subprocess.Popen([sys.executable, "-m", "screening.cli", "--config", str(cfg), "run"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        (inbox / "R1_R.jpg").write_bytes(fundus_jpeg(881))
        deadline = time.monotonic() + 300
        while (inbox / "R1_R.jpg").exists() and time.monotonic() < deadline and watcher.poll() is None:
            time.sleep(0.5)
        first_graded = not (inbox / "R1_R.jpg").exists()
        with sqlite3.connect(other / "screening.db") as src, sqlite3.connect(folder / "screening.db") as dst:
            src.backup(dst)
        (inbox / "R2_R.jpg").write_bytes(fundus_jpeg(882))
        try:
            code = watcher.wait(120)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(60)
    assert watcher.stderr is not None
    errors = [line for line in watcher.stderr.read().splitlines() if "error:" in line]
    recorded = query(folder, "SELECT count(*) FROM images")[0][0]
    left = (inbox / "R2_R.jpg").is_file()
    (inbox / "R2_R.jpg").unlink(missing_ok=True)  # the next probe starts from an empty inbox
    return {"other_database_made": made.returncode == 0, "first_photo_graded": first_graded, "exit_code": code,
            "message": errors[-1][:200] if errors else "", "second_photo_left_in_inbox": left,
            "images_in_the_other_database": recorded}


def faults(folder: Path, checkpoint: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cfg = config(folder, checkpoint)
    inbox, archive = folder / "inbox", folder / "archive"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    watcher = subprocess.Popen([sys.executable, "-m", "screening.cli", "--config", str(cfg), "run"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        second = cli(cfg, "run", "--once")
        out["second_worker_exit_code"] = second.returncode
        out["second_worker_message"] = second.stderr.strip().splitlines()[-1] if second.stderr.strip() else ""
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(60)
    out["database_restored_in_place"] = restored_in_place(folder, cfg, env)
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(archive)], capture_output=True)
        if mounted.returncode == 0:
            try:
                filler = archive / "filler"
                with open(filler, "wb", buffering=0) as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 4096)
                    except OSError:
                        pass
                (inbox / "F1_R.jpg").write_bytes(fundus_jpeg(777))
                full = cli(cfg, "run", "--once")
                state = query(folder, "SELECT state FROM images WHERE source_name = 'F1_R.jpg'")
                partial = [p.name for p in archive.rglob("*") if p.is_file() and p.name != "filler"]
                filler.unlink()
                again = cli(cfg, "run", "--once")
                out["full_archive"] = {
                    "log_when_full": [line[24:] for line in full.stderr.splitlines() if " ERROR " in line or "error:" in line][-4:],
                    "exit_code_when_full": full.returncode, "state_when_full": state[0][0] if state else None,
                    "partial_files_when_full": partial, "exit_code_with_room": again.returncode,
                    "archived_with_room": any(archive.rglob("*F1_R.jpg")) and not (inbox / "F1_R.jpg").exists(),
                }
            finally:
                subprocess.run(["umount", "-l", str(archive)], capture_output=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "baseline.pt")
    ap.add_argument("--photos", type=int, default=20)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--parts", default="bad_input,kill9,faults", help="which parts to run (default: all three)")
    args = ap.parse_args()
    info = machine_info()
    print_header("robustness", info)
    top = Path(tempfile.mkdtemp(prefix="dr-robustness-"))
    try:
        results: dict[str, Any] = {"machine": info, "checkpoint": str(args.checkpoint)}
        for name, fn in (("bad_input", lambda d: bad_input(d, args.checkpoint)),
                         ("kill9", lambda d: killed_restarts(d, args.checkpoint, args.photos, args.kills, args.seed)),
                         ("faults", lambda d: faults(d, args.checkpoint))):
            if name not in args.parts.split(","):
                continue
            folder = top / name
            folder.mkdir()
            t0 = time.monotonic()
            results[name] = fn(folder)
            results[name]["wall_s"] = round(time.monotonic() - t0, 1)
            print(f"\n[{name}]\n" + json.dumps(results[name], indent=2, ensure_ascii=False))
        bad, kill, fault = results.get("bad_input"), results.get("kill9"), results.get("faults")
        ok = True
        if bad is not None:
            ok &= (not bad["wrong"] and not bad["left_in_inbox"] and bad["audit_counts_every_drop_once"]
                   and bad["link_target_untouched"] and bad["long_name_keeps_extension"] and not bad["traceback"]
                   and bad["placeholder_left_alone"])
            print(f"\nbad input: {bad['kinds']} kinds tried, {len(bad['wrong'])} with the wrong outcome")
        if kill is not None:
            ok &= (kill["files_lost"] == 0 and kill["graded_once_archived_same_sha"] and kill["left_in_inbox"] == 0
                   and kill["pdfs_unrecorded"] == 0 and kill["integrity"] == "ok")
            print(f"kill -9: {kill['kills']} restarts survived, files lost {kill['files_lost']}")
        if fault is not None:
            ok &= fault["second_worker_exit_code"] == 3 and fault.get("full_archive", {}).get("archived_with_room", True)
            restored = fault["database_restored_in_place"]
            ok &= (restored["exit_code"] == 3 and restored["second_photo_left_in_inbox"]
                   and restored["images_in_the_other_database"] == 0)
        print("PASS" if ok else "FAIL")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {top}")
        else:
            shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
