"""The shared concepts: one hashing function, atomic writes, safe names, the vocabulary, the fundus threshold."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.common import (
    FUNDUS_THRESHOLD,
    LESION_CODES,
    LESION_KEYS,
    LESION_NAMES,
    PATHOLOGY_CODES,
    atomic_write,
    atomic_write_bytes,
    atomic_write_dir,
    atomic_write_text,
    is_safe_id,
    safe_file_name,
    safe_id,
    sha256_file,
)

PROJECT = Path(__file__).resolve().parents[2]


def test_importing_common_loads_neither_torch_nor_numpy():
    """The report renderer process uses it and must stay small."""
    code = "import sys, training.common; print(sorted(m for m in ('torch', 'numpy', 'cv2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 17)
    p = tmp_path / "a.jpg"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, chunk=1000) == hashlib.sha256(data).hexdigest()
    (tmp_path / "e.jpg").write_bytes(b"")
    assert sha256_file(tmp_path / "e.jpg") == hashlib.sha256(b"").hexdigest()


# ------------------------------------------------------------------------------------------- safe names


def test_safe_id_keeps_safe_ids_and_never_merges_two():
    assert safe_id("PAT-001_a") == "PAT-001_a"
    evil = safe_id("../../etc")
    assert re.fullmatch(r"[A-Za-z0-9_-]+", evil) and ".." not in evil
    assert safe_id("a/b") != safe_id("a_b")  # no folder shared by two patients
    assert len(safe_id("x" * 65)) == 64 + 9 and safe_id("x" * 65) != safe_id("x" * 66)
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            safe_id(bad)


@pytest.mark.parametrize("reserved", ["CON", "con", "Nul", "AUX", "PRN", "COM1", "lpt9"])
def test_safe_id_never_gives_a_name_windows_reserves(reserved):
    """A valid patient id (``is_safe_id``) whose folder could not be made on a Windows disk or SMB share."""
    assert is_safe_id(reserved)
    folder = safe_id(reserved)
    assert folder.startswith(reserved + "-") and re.fullmatch(r"[A-Za-z0-9_-]+-[0-9a-f]{8}", folder)
    assert safe_id("CONX") == "CONX" and safe_id("COM10") == "COM10" and safe_id("PCON") == "PCON"


@pytest.mark.parametrize("value, ok", [("P1", True), ("a-b_C9", True), ("x" * 64, True), ("x" * 65, False), ("", False),
                                       ("..", False), ("a/b", False), ("a b", False), ("é1", False), ("P1\n", False),
                                       (12, False)])
def test_is_safe_id(value, ok):
    assert is_safe_id(value) is ok
    if ok:
        assert safe_id(value) == value


@pytest.mark.parametrize("name, expected", [
    ("Patient1_L.jpg", "Patient1_L.jpg"), ("../../etc/passwd", "passwd"), ("a b&c.jpg", "a_b_c.jpg"),
    (".hidden.jpg", "hidden.jpg"), ("..", "file"), ("", "file"), ("ü.png", "_.png"),
])
def test_safe_file_name(name, expected):
    assert safe_file_name(name) == expected
    assert len(safe_file_name("y" * 500)) == 120


def test_a_long_name_keeps_its_extension():
    """A 250-character photo name used to lose its '.jpg' in the archive (issue 12)."""
    long = "P1_R_" + "x" * 245 + ".jpg"
    cut = safe_file_name(long)
    assert len(cut) == 120 and cut.endswith(".jpg") and cut.startswith("P1_R_xxx")
    assert safe_file_name("y" * 500).startswith("yyy")  # no extension: simply cut


# ---------------------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_or_refuses_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"three", overwrite=False)
    assert target.read_text() == "two"
    assert atomic_write_bytes(tmp_path / "new.pdf", b"%PDF", overwrite=False).read_bytes() == b"%PDF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "new.pdf"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_a_plainly_created_file_gets(tmp_path: Path, umask: int, mode: int) -> None:
    """Reports, reason files and pictures are read by staff as other users: mkstemp's 0600 hid them."""
    old = os.umask(umask)
    try:
        written = [atomic_write_text(tmp_path / f"reason{umask}.txt", "why"),
                   atomic_write_bytes(tmp_path / f"report{umask}.pdf", b"%PDF", overwrite=False)]
        plain = tmp_path / f"plain{umask}.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in written] == [mode, mode] == [stat.S_IMODE(plain.stat().st_mode)] * 2


def test_atomic_write_follows_the_folders_default_acl_as_a_plain_file_does(tmp_path: Path) -> None:
    """A shared folder whose default ACL lets staff read: the umask does not apply, and a chmod after mkstemp would
    have narrowed the ACL's mask (0600 -> the staff entry unreadable)."""
    if shutil.which("setfacl") is None:
        pytest.skip("setfacl is not installed (package acl; scripts/system-deps.sh installs it)")
    folder = tmp_path / "shared"
    folder.mkdir()
    done = subprocess.run(["setfacl", "-d", "-m", "u::rw,g::r,o::r,u:nobody:r", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this file system takes no ACLs: {done.stderr.strip()}")
    old = os.umask(0o077)
    try:
        written = atomic_write_text(folder / "report.txt", "x")
        plain = folder / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    acl = subprocess.run(["getfacl", "-p", str(written)], capture_output=True, text=True).stdout
    assert "user:nobody:r--" in acl and "mask::r--" in acl


def test_atomic_write_hands_the_writer_a_name_with_the_final_suffix_and_cleans_up_on_failure(tmp_path: Path) -> None:
    seen = []

    def writer(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "plot.png", writer)
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path  # writers that pick the format by suffix work
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_atomic_write_dir_publishes_all_files_at_once(tmp_path: Path) -> None:
    final = tmp_path / "out"

    def fill(names):
        def write(folder: Path) -> None:
            assert folder != final and not (final.exists() and folder == final)
            for n in names:
                (folder / n).write_text(n)
        return write

    atomic_write_dir(final, fill(["a", "b"]))
    atomic_write_dir(final, fill(["c"]))  # replaces the old folder's content entirely
    assert sorted(p.name for p in final.iterdir()) == ["c"]
    with pytest.raises(RuntimeError):
        atomic_write_dir(final, lambda folder: (_ for _ in ()).throw(RuntimeError("encoder failed")))
    assert sorted(p.name for p in final.iterdir()) == ["c"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------- vocabulary and fundus


def test_vocabulary_derivations():
    assert LESION_KEYS == ("ma", "he", "ex", "se", "od")
    assert LESION_NAMES == {"MA": "Microaneurysms", "HE": "Haemorrhages", "EX": "Hard exudates",
                            "SE": "Soft exudates", "OD": "Optic disc"}
    assert PATHOLOGY_CODES == LESION_CODES[:4] and "OD" not in PATHOLOGY_CODES


def test_fundus_mask_is_the_one_threshold():
    from training.data.transforms import fundus_bbox, fundus_mask

    image = np.zeros((64, 64, 3), np.uint8)
    image[10:50, 20:40, 0] = FUNDUS_THRESHOLD + 1  # just lit, in the red channel only
    image[0:5, 0:5, 2] = FUNDUS_THRESHOLD  # at the threshold: still the dark surround
    mask = fundus_mask(image)
    assert mask.dtype == bool and mask.sum() == 40 * 20 and not mask[:5, :5].any()
    assert fundus_bbox(image) == (10, 50, 20, 40)


def test_a_top_level_option_may_follow_the_subcommand_at_any_depth_and_the_last_one_given_stands():
    import argparse

    from training.cli import build_parser
    from training.common import also_after_subcommands

    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--config", default="config.toml", help="settings file (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("audit").add_argument("--json")
    group = sub.add_parser("review").add_subparsers(dest="review_command", required=True)
    group.add_parser("list")
    with pytest.raises(SystemExit):  # argparse alone: "unrecognized arguments"
        p.parse_args(["review", "list", "--config", "a.toml"])
    also_after_subcommands(p, "--config")
    assert p.parse_args(["audit"]).config == "config.toml"  # the default stands
    assert p.parse_args(["--config", "a.toml", "audit"]).config == "a.toml"
    assert p.parse_args(["audit", "--config", "b.toml", "--json", "x"]).config == "b.toml"
    assert p.parse_args(["review", "list", "--config", "c.toml"]).config == "c.toml"
    assert p.parse_args(["--config", "a.toml", "review", "list", "--config", "c.toml"]).config == "c.toml"
    assert "(default: config.toml)" in sub.choices["audit"].format_help()  # not "==SUPPRESS=="
    assert build_parser().parse_args(["evaluate", "--checkpoint", "m.pt", "--config", "t.toml"]).config == "t.toml"
