"""Intake layer: names, sidecars, ignoring, hashing, stability, sweep, watchers, Intake.poll."""

from __future__ import annotations

import json
import os
import time
from datetime import date
from pathlib import Path

import pytest

from screening.config import DEFAULT_PATTERNS, ScreeningSettings
from screening.intake import (
    SUPPORTED_SUFFIXES,
    Identity,
    InboxWatcher,
    Intake,
    StabilityTracker,
    check_supported,
    duration_text,
    is_ignored,
    is_supported,
    parse_identity,
    sidecar_for,
    stray_rejection,
    sweep,
    wait_until_stable,
)
from screening.rejection import Rejection, RejectReason


def unidentified(path: Path, patterns=DEFAULT_PATTERNS) -> Rejection:
    """The Rejection parse_identity raises for ``path`` (failing the test when it raises none)."""
    with pytest.raises(Rejection) as exc:
        parse_identity(path, patterns)
    assert exc.value.code == RejectReason.IDENTITY
    return exc.value


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def write(path: Path, data: bytes = b"img", mtime_ns: int | None = None) -> Path:
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def append(path: Path, data: bytes, mtime_ns: int) -> None:
    with open(path, "ab") as f:
        f.write(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


# ----------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Patient001_L.jpg", Identity("Patient001", "L", None, eye_from="file name")),
        ("Patient7_R.png", Identity("Patient7", "R", None, eye_from="file name")),
        ("P123_OD_20250102.jpg", Identity("P123", "R", date(2025, 1, 2), eye_from="file name")),
        ("AB-9_OS_20241231.tif", Identity("AB-9", "L", date(2024, 12, 31), eye_from="file name")),
        ("Patient001_l.jpg", Identity("Patient001", "L", None, eye_from="file name")),
        ("Patient001_od.JPG", Identity("Patient001", "R", None, eye_from="file name")),
        ("Patient001_Left.jpeg", Identity("Patient001", "L", None, eye_from="file name")),
        ("x9_RIGHT_20250102.bmp", Identity("x9", "R", date(2025, 1, 2), eye_from="file name")),
        ("x9_os_20250102.png", Identity("x9", "L", date(2025, 1, 2), eye_from="file name")),
        # a field number at the end: another photo of the same eye and visit
        ("A1234_OD_20251120_2.jpg", Identity("A1234", "R", date(2025, 11, 20), eye_from="file name")),
        ("Patient017_L_1.jpg", Identity("Patient017", "L", None, eye_from="file name")),
    ],
)
def test_parse_identity_from_name(tmp_path: Path, name: str, expected: Identity) -> None:
    assert parse_identity(tmp_path / name, DEFAULT_PATTERNS) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Patient001.jpg", Identity("Patient001", None, None)),
        ("A1234_20251120.jpg", Identity("A1234", None, date(2025, 11, 20))),
        ("A1234_20251120_3.jpg", Identity("A1234", None, date(2025, 11, 20))),
    ],
)
def test_names_without_an_eye_leave_it_to_the_photo(tmp_path: Path, name: str, expected: Identity) -> None:
    """The eye is then read from the photo (screening.checks) or the file is refused there, saying why."""
    assert parse_identity(tmp_path / name, DEFAULT_PATTERNS) == expected


def test_sidecar_without_eye_leaves_it_to_the_photo(tmp_path: Path) -> None:
    img = write(tmp_path / "IMG_3.jpg")
    (tmp_path / "IMG_3.json").write_text('{"patient_id": "P1"}')
    assert parse_identity(img, DEFAULT_PATTERNS) == Identity("P1", None, None)


def test_invalid_date_in_name_is_error(tmp_path: Path) -> None:
    res = unidentified(tmp_path / "P1_L_20251301.jpg")
    assert "20251301" in res.message and "date" in res.message
    unidentified(tmp_path / "P1_L_20250230.jpg")


@pytest.mark.parametrize("name", ["P1_R_123.jpg", "Patient017_2.jpg", "P1_R_20250102_.jpg"])
def test_a_field_number_is_one_or_two_digits_after_an_eye_or_a_date(tmp_path: Path, name: str) -> None:
    """``P1_R_123`` could be a field or a typo in a date: it is refused, saying how to name the file."""
    assert "no patient id" in unidentified(tmp_path / name).message


@pytest.mark.parametrize("name", ["IMG0001.jpg", "DSC01234.JPG", "img0042.jpg", "PXL20261202.jpg", "IM000101.png",
                                  "scan8.jpg", "IMG0001_R.jpg", "DSCN0007_OD_20261202.jpg"])
def test_a_cameras_own_numbering_is_not_a_patient_id(tmp_path: Path, name: str) -> None:
    """Two patients' IMG0001.jpg were filed as one patient 'IMG0001', their photos in one visit and one report."""
    res = unidentified(tmp_path / name)
    assert "a camera's own numbering" in res.message and f"sidecar {Path(name).stem}.json" in res.message
    sidecar = write(tmp_path / name)  # with a sidecar naming the patient, the same name is fine
    (tmp_path / f"{Path(name).stem}.json").write_text('{"patient_id": "P77"}')
    assert parse_identity(sidecar, DEFAULT_PATTERNS).patient_id == "P77"


def test_ids_that_only_start_like_a_camera_name_are_patient_ids(tmp_path: Path) -> None:
    for name, patient in (("IMRAN7_L.jpg", "IMRAN7"), ("Scanlon12_R.jpg", "Scanlon12"), ("DSCA1_R.jpg", "DSCA1")):
        assert parse_identity(tmp_path / name, DEFAULT_PATTERNS).patient_id == patient


def test_no_patient_id_error_message(tmp_path: Path) -> None:
    res = unidentified(tmp_path / "x.jpg")
    assert "no patient id in the file name 'x.jpg'" in res.message
    assert "no sidecar x.json" in res.message
    assert "Patient001_L.jpg" in res.message and "<id>_<eye>_<yyyymmdd>.jpg" in res.message
    assert str(res) == res.message


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("E1011_right_2025-11-20.jpg", Identity("E1011", "R", date(2025, 11, 20), eye_from="file name")),
        ("E1008_RE_20251120.jpg", Identity("E1008", "R", date(2025, 11, 20), eye_from="file name")),
        ("A1234_LE_20251120_2.jpg", Identity("A1234", "L", date(2025, 11, 20), eye_from="file name")),
        ("Patient017_le.jpg", Identity("Patient017", "L", None, eye_from="file name")),
        ("A1234_2025-11-20_3.jpg", Identity("A1234", None, date(2025, 11, 20))),
    ],
)
def test_names_with_re_le_eyes_and_dashed_dates(tmp_path: Path, name: str, expected: Identity) -> None:
    """UK clinics write the eye RE/LE; many write the date YYYY-MM-DD. Both were refused as "no patient id"."""
    assert parse_identity(tmp_path / name, DEFAULT_PATTERNS) == expected


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("E1011_OU_20251120.jpg", ("'OU' is not an eye", "R, RE, OD or right", "one photo per eye")),
        ("E1011_rechts.jpg", ("'rechts' is not an eye", "R, RE, OD or right")),
        ("E1011_R_20.11.2025.jpg", ("'20.11.2025' looks like a date", "YYYYMMDD (20251120) or YYYY-MM-DD")),
        ("E1011_R_2025-1-5.jpg", ("'2025-1-5' looks like a date", "YYYYMMDD (20250105) or YYYY-MM-DD")),
        # day and month could be either way round, the year either end: no example is guessed
        ("E1011_R_05.11.2025.jpg", ("'05.11.2025' looks like a date", "write dates as YYYYMMDD or YYYY-MM-DD")),
        ("E1011_L_201125.jpg", ("'201125' looks like a date", "write dates as YYYYMMDD or YYYY-MM-DD")),
    ],
)
def test_a_name_no_pattern_takes_is_refused_saying_what_is_wrong(tmp_path: Path, name: str, fragments: tuple[str, ...]) -> None:
    """It was refused as having "no patient id", though the id was there and the eye or the date was the problem."""
    message = unidentified(tmp_path / name).message
    assert all(f in message for f in fragments), message
    assert "no patient id" not in message
    # still names the file and the sidecar way out, and ends with how to name files
    assert f"'{name}'" in message and f"sidecar {Path(name).stem}.json" in message
    assert message.endswith("date YYYYMMDD or YYYY-MM-DD)")


@pytest.mark.parametrize(
    ("name", "fragment", "suggested", "expected"),
    [
        ("A1234_OD_20251120 (1).jpg", "'(1)' at its end looks like what a computer adds to a copy's name",
         "A1234_OD_20251120.jpg", Identity("A1234", "R", date(2025, 11, 20))),
        ("A1234_OD_20251120 - Copy (2).jpg", "'- Copy (2)' at its end", "A1234_OD_20251120.jpg",
         Identity("A1234", "R", date(2025, 11, 20))),
        ("Patient017_L copy 2.jpg", "'copy 2' at its end", "Patient017_L.jpg", Identity("Patient017", "L", None)),
        ("A1234 OD 20251120.jpg", "separate the patient id, eye and date with '_'", "A1234_OD_20251120.jpg",
         Identity("A1234", "R", date(2025, 11, 20))),
        # a hyphen in the id stays, one in a YYYY-MM-DD date too
        ("AB-12-OD-2025-11-20.jpg", "separate the patient id", "AB-12_OD_2025-11-20.jpg",
         Identity("AB-12", "R", date(2025, 11, 20))),
        ("Patient017-left.jpg", "separate the patient id", "Patient017_left.jpg", Identity("Patient017", "L", None)),
        ("AB-12 OD 20251120.jpg", "separate the patient id", "AB-12_OD_20251120.jpg",
         Identity("AB-12", "R", date(2025, 11, 20))),
        ("A1234.OS.20251120.jpg", "separate the patient id", "A1234_OS_20251120.jpg",
         Identity("A1234", "L", date(2025, 11, 20))),
    ],
)
def test_a_copy_or_a_name_with_other_separators_is_refused_with_the_name_to_use(
        tmp_path: Path, name: str, fragment: str, suggested: str, expected: Identity) -> None:
    """Copies Windows or macOS numbered ("(1)", "- Copy") and names with spaces, hyphens or dots between the parts
    were refused as having "no patient id". The message now names the file to drop instead, and that name is
    one the patterns take, with the same patient, eye and date."""
    message = unidentified(tmp_path / name).message
    assert fragment in message and f"rename it {suggested}" in message, message
    assert "no patient id" not in message
    found = parse_identity(tmp_path / suggested, DEFAULT_PATTERNS)
    assert (found.patient_id, found.eye, found.exam_date) == (expected.patient_id, expected.eye, expected.exam_date)


def test_a_copy_of_a_field_is_offered_the_second_field_name_only_where_the_patterns_take_one(tmp_path: Path) -> None:
    message = unidentified(tmp_path / "A1234_OD_20251120 (1).jpg").message
    assert "or A1234_OD_20251120_2.jpg if it is a second photo of that eye" in message
    # a site whose only pattern has no field number is never offered a name it would refuse
    site = [r"^(?P<patient>[A-Z]\d+)_(?P<eye>OD|OS)$"]
    with pytest.raises(Rejection) as info:
        parse_identity(tmp_path / "A1234_OD (1).jpg", site)
    assert "rename it A1234_OD.jpg" in info.value.message and "_2.jpg" not in info.value.message
    parse_identity(tmp_path / "A1234_OD.jpg", site)


@pytest.mark.parametrize(
    ("name", "shown", "letter"),
    [("Müller017_L.jpg", "('ü')", True), ("Patient 017 L.jpg", "(a space)", False),
     ("DSC01234 (1).jpg", "(a space, '(', ')')", False)],
)
def test_a_name_with_characters_the_names_do_not_take_says_which(tmp_path: Path, name: str, shown: str,
                                                                  letter: bool) -> None:
    """A patient id with a letter outside A-Z was refused as having "no patient id"."""
    message = unidentified(tmp_path / name).message
    assert f"it has characters the names do not take {shown}" in message, message
    assert ("another letter" in message) == letter
    assert "no patient id" not in message


@pytest.mark.parametrize("name", ["holiday.jpg", "P1_R_143015.jpg", "P1_R_20251120_101205.jpg"])
def test_a_name_with_nothing_recognisable_gets_the_general_message(tmp_path: Path, name: str) -> None:
    """A camera's time (143015) is not taken for a date; nor is a six-digit part beside a date."""
    message = unidentified(tmp_path / name).message
    assert f"no patient id in the file name '{name}'" in message
    assert message.endswith("(eye L, R, LE, RE, OS, OD, left or right; date YYYYMMDD or YYYY-MM-DD)")


def test_sidecar_supplies_identity(tmp_path: Path) -> None:
    img = write(tmp_path / "IMG_0001.jpg")
    (tmp_path / "IMG_0001.json").write_text(json.dumps({"patient_id": "Pat42", "eye": "OD", "exam_date": "2025-03-04"}))
    assert sidecar_for(img) == tmp_path / "IMG_0001.json"
    assert parse_identity(img, DEFAULT_PATTERNS) == Identity("Pat42", "R", date(2025, 3, 4), eye_from="sidecar IMG_0001.json")


def test_sidecar_named_after_full_name_and_missing_date(tmp_path: Path) -> None:
    img = write(tmp_path / "scan.tif")
    (tmp_path / "scan.tif.json").write_text(json.dumps({"patient_id": "A1", "eye": "left"}))
    assert parse_identity(img, DEFAULT_PATTERNS) == Identity("A1", "L", None, eye_from="sidecar scan.tif.json")


def test_sidecar_overrides_and_complements_name(tmp_path: Path) -> None:
    img = write(tmp_path / "Patient7_L.jpg")
    (tmp_path / "Patient7_L.json").write_text(json.dumps({"exam_date": "2024-02-29", "eye": "R"}))
    assert parse_identity(img, DEFAULT_PATTERNS) == Identity("Patient7", "R", date(2024, 2, 29), eye_from="sidecar Patient7_L.json")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ('{"patient_id": "P1", "eye": "L", "exam_date": "2025-13-01"}', "date"),
        ('{"patient_id": "P1", "eye": "X"}', "eye"),
        ('{"eye": "L"}', "no patient id"),
        ('["P1", "L"]', "JSON object"),
        ("{not json", "could not be read"),
        ('{"patient_id": ["P1"], "eye": "L"}', "must be a string"),
    ],
)
def test_bad_sidecars_are_errors(tmp_path: Path, payload: str, fragment: str) -> None:
    img = write(tmp_path / "IMG_1.jpg")
    (tmp_path / "IMG_1.json").write_text(payload)
    assert fragment in unidentified(img).message


@pytest.mark.parametrize("bad_id", ["../etc", "..", "a/b", "a\\b", "/abs", "a b", "x" * 65, "é1", "P1\n"])
def test_path_traversal_and_bad_ids_in_sidecar_rejected(tmp_path: Path, bad_id: str) -> None:
    img = write(tmp_path / "IMG_2.jpg")
    (tmp_path / "IMG_2.json").write_text(json.dumps({"patient_id": bad_id, "eye": "L"}))
    assert "invalid patient id" in unidentified(img).message


def test_path_traversal_in_name_rejected_with_permissive_pattern(tmp_path: Path) -> None:
    pats = (r"^(?P<patient>.+)_(?P<eye>L|R)$",)
    for name in ("..._L.jpg", "a..b_L.jpg", "x.y_R.png"):
        assert "invalid patient id" in unidentified(tmp_path / name, pats).message, name
    assert parse_identity(tmp_path / "ok-1_L.jpg", pats) == Identity("ok-1", "L", None, eye_from="file name")
    assert parse_identity(tmp_path / ("x" * 64 + "_L.jpg"), pats) == Identity("x" * 64, "L", None, eye_from="file name")


def test_patterns_tried_in_order(tmp_path: Path) -> None:
    pats = (r"^(?P<patient>\d+)-(?P<eye>[LR])$", r"^(?P<patient>[a-z]+)_(?P<eye>[LR])$")
    assert parse_identity(tmp_path / "123-L.jpg", pats) == Identity("123", "L", None, eye_from="file name")
    assert parse_identity(tmp_path / "abc_R.jpg", pats) == Identity("abc", "R", None, eye_from="file name")


# ------------------------------------------------------------------------------------ names/suffixes


@pytest.mark.parametrize(
    "name",
    [".hidden.jpg", ".DS_Store", "~$report.docx", "a.jpg.part", "a.TMP", "a.jpg.crdownload", "a.partial",
     "Thumbs.db", "thumbs.DB", "desktop.ini", "Patient7_L.json", "x.jpg.JSON", ""],
)
def test_ignored_names(name: str) -> None:
    assert is_ignored(name)


@pytest.mark.parametrize("name", ["Patient001_L.jpg", "scan.TIFF", "notes.txt", "archive.zip", "noext", "a.part.jpg"])
def test_not_ignored_names(name: str) -> None:
    assert not is_ignored(name)
    assert not is_ignored(Path("/inbox") / name)


def test_supported_suffixes_case_insensitive() -> None:
    assert SUPPORTED_SUFFIXES == {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
    for n in ("a.JPG", "a.Jpeg", "a.png", "a.TIF", "a.tiff", "a.BMP", "a.DCM", "a.dicom"):
        assert is_supported(n)
        check_supported(n)  # raises nothing
    for name, fragments in (("report.pdf", ("'.pdf'", ".jpg")), ("README", ("no file extension", "not a DICOM file"))):
        with pytest.raises(Rejection) as exc:
            check_supported(name)
        assert exc.value.code == RejectReason.UNSUPPORTED_TYPE and all(f in exc.value.message for f in fragments)


# ----------------------------------------------------------------------------------------- stability


def test_file_written_in_chunks_not_stable_until_it_stops_growing(tmp_path: Path) -> None:
    clock = FakeClock()
    tr = StabilityTracker(2.0, clock)
    p = write(tmp_path / "P1_L.jpg", b"a" * 10, mtime_ns=1_000_000_000)
    assert not tr.observe(p)
    for i in range(5):  # a chunk arrives every 1.5 s: never 2 s unchanged
        clock.advance(1.5)
        append(p, b"b" * 10, mtime_ns=(2 + i) * 1_000_000_000)
        assert not tr.observe(p)
    clock.advance(1.9)
    assert not tr.observe(p)
    clock.advance(0.1)
    assert tr.observe(p)
    assert tr.observe(p)  # stays stable while unchanged


def test_same_size_but_new_mtime_resets(tmp_path: Path) -> None:
    clock = FakeClock()
    tr = StabilityTracker(1.0, clock)
    p = write(tmp_path / "a.jpg", b"xxxx", mtime_ns=5_000_000_000)
    tr.observe(p)
    clock.advance(0.9)
    os.utime(p, ns=(6_000_000_000, 6_000_000_000))
    assert not tr.observe(p)
    clock.advance(0.9)
    assert not tr.observe(p)
    clock.advance(0.1)
    assert tr.observe(p)


def test_zero_byte_file_eventually_reported(tmp_path: Path) -> None:
    clock = FakeClock()
    tr = StabilityTracker(2.0, clock)
    p = write(tmp_path / "empty.jpg", b"")
    assert not tr.observe(p)
    clock.advance(2.0)
    assert not tr.observe(p)  # normal files would be stable now
    clock.advance(17.9)
    assert not tr.observe(p)
    clock.advance(0.1)
    assert tr.observe(p)


def test_zero_byte_then_content_uses_normal_delay(tmp_path: Path) -> None:
    clock = FakeClock()
    tr = StabilityTracker(2.0, clock)
    p = write(tmp_path / "a.jpg", b"", mtime_ns=1_000_000_000)
    tr.observe(p)
    clock.advance(5)
    append(p, b"data", mtime_ns=2_000_000_000)
    assert not tr.observe(p)
    clock.advance(2)
    assert tr.observe(p)


def test_vanished_file_forgotten(tmp_path: Path) -> None:
    clock = FakeClock()
    tr = StabilityTracker(1.0, clock)
    p = write(tmp_path / "a.jpg")
    tr.observe(p)
    assert p in tr and len(tr) == 1
    p.unlink()
    assert not tr.observe(p)
    assert p not in tr and len(tr) == 0
    write(p, b"new")
    clock.advance(5)
    assert not tr.observe(p)  # re-appeared: starts over


def test_wait_until_stable_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    a = write(tmp_path / "a.jpg")
    gone = tmp_path / "gone.jpg"
    res = wait_until_stable([a, gone], timeout=10, stable_seconds=1.0, clock=clock, sleep=clock.advance)
    assert res == [a]
    assert clock.t - 1000.0 < 2


def test_wait_until_stable_times_out_for_growing_file(tmp_path: Path) -> None:
    clock = FakeClock()
    p = write(tmp_path / "a.jpg", b"x", mtime_ns=1)
    n = [1]

    def sleep(dt: float) -> None:
        clock.advance(dt)
        n[0] += 1
        append(p, b"x", mtime_ns=n[0])

    assert wait_until_stable([p], timeout=3, stable_seconds=1.0, clock=clock, sleep=sleep) == []


# --------------------------------------------------------------------------------------------- sweep


def test_sweep_lists_candidates_by_mtime(tmp_path: Path) -> None:
    write(tmp_path / "b.jpg", mtime_ns=3_000_000_000)
    write(tmp_path / "a.jpg", mtime_ns=1_000_000_000)
    write(tmp_path / "c.pdf", mtime_ns=2_000_000_000)  # unsupported: still listed, pipeline rejects it
    write(tmp_path / "d.jpg.part")
    write(tmp_path / ".hidden.jpg")
    write(tmp_path / "a.json", b"{}")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "x.jpg")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    os.utime(tmp_path / "sub", ns=(4_000_000_000, 4_000_000_000))
    os.utime(tmp_path / "link.jpg", ns=(5_000_000_000, 5_000_000_000), follow_symlinks=False)
    # a folder and a link are listed (never followed or entered) so that the pipeline refuses them with a reason
    assert [p.name for p in sweep(tmp_path)] == ["a.jpg", "c.pdf", "b.jpg", "sub", "link.jpg"]
    # hidden and temporary names only once left unchanged for abandoned_after; a sidecar with its photo never
    old = time.time() - 7200
    for name in ("d.jpg.part", ".hidden.jpg", "a.json"):
        os.utime(tmp_path / name, (old, old))
    assert {p.name for p in sweep(tmp_path, abandoned_after=3600)} - {p.name for p in sweep(tmp_path)} == {
        "d.jpg.part", ".hidden.jpg"}


def test_the_inbox_placeholder_is_left_alone(tmp_path: Path) -> None:
    """The repository's own inbox/.gitkeep was moved to rejected/ as a hidden name left behind. It, and only it
    (that exact name, an empty regular file), is never a candidate; anything else hidden still is, once old."""
    old = time.time() - 7200
    for name, data in ((".gitkeep", b""), (".gitkeep.jpg", b""), (".GITKEEP", b""), (".keep", b"")):
        write(tmp_path / name, data)
        os.utime(tmp_path / name, (old, old))
    assert {p.name for p in sweep(tmp_path, abandoned_after=3600)} == {".gitkeep.jpg", ".GITKEEP", ".keep"}
    write(tmp_path / ".gitkeep", b"a photo hidden under the placeholder's name")  # no longer empty: refused
    os.utime(tmp_path / ".gitkeep", (old, old))
    assert ".gitkeep" in {p.name for p in sweep(tmp_path, abandoned_after=3600)}
    (tmp_path / ".gitkeep").unlink()
    (tmp_path / ".gitkeep").mkdir()  # not a regular file: refused like any folder
    os.utime(tmp_path / ".gitkeep", (old, old))
    assert ".gitkeep" in {p.name for p in sweep(tmp_path, abandoned_after=3600)}


def test_sweep_missing_inbox_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        sweep(tmp_path / "nope")


# ------------------------------------------------------------------------------------------- watcher


def _wait_for(watcher: InboxWatcher, target: Path, timeout: float = 1.5) -> set[Path]:
    seen: set[Path] = set()
    deadline = time.monotonic() + timeout
    while target not in seen and time.monotonic() < deadline:
        seen |= watcher.pending(timeout=0.05)
    return seen


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_watcher_sees_new_file(tmp_path: Path, kind: str) -> None:
    with InboxWatcher(tmp_path, kind, poll_interval=0.05) as w:
        assert w.running and w.active_kind == kind
        p = write(tmp_path / "P1_L.jpg", b"data")
        assert p in _wait_for(w, p)
        (tmp_path / "P2_R.jpg.part").write_bytes(b"x")
        os.rename(tmp_path / "P2_R.jpg.part", tmp_path / "P2_R.jpg")
        assert tmp_path / "P2_R.jpg" in _wait_for(w, tmp_path / "P2_R.jpg")
    assert not w.running
    assert w.pending(0) <= {tmp_path / n for n in ("P1_L.jpg", "P2_R.jpg", "P2_R.jpg.part")}


def test_watcher_missing_inbox_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="inbox"):
        InboxWatcher(tmp_path / "missing").start()


def test_watcher_from_settings_and_bad_kind(tmp_path: Path) -> None:
    w = InboxWatcher.from_settings(ScreeningSettings(inbox=tmp_path, observer="polling", poll_interval=0.3))
    assert (w.observer_kind, w.poll_interval, w.inbox) == ("polling", 0.3, tmp_path)
    with pytest.raises(ValueError):
        InboxWatcher(tmp_path, "inotify")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------- intake


def _settings(tmp_path: Path, **kw) -> ScreeningSettings:
    kw.setdefault("inbox", tmp_path)
    kw.setdefault("stable_seconds", 2.0)
    kw.setdefault("sweep_interval", 30.0)
    return ScreeningSettings(**kw)


def test_intake_returns_each_file_once(tmp_path: Path) -> None:
    clock = FakeClock()
    a = write(tmp_path / "P1_L.jpg", mtime_ns=1_000_000_000)
    b = write(tmp_path / "P2_R.jpg", mtime_ns=2_000_000_000)
    write(tmp_path / "P3_L.jpg.part")
    intake = Intake(_settings(tmp_path), clock=clock)
    assert intake.poll() == []  # first sweep: seen, not yet stable
    assert intake.pending == {a, b}
    clock.advance(2.0)
    assert intake.poll() == [a, b]
    for _ in range(3):
        clock.advance(31)  # several sweeps while the files are still there
        assert intake.poll() == []
    # changed after being returned -> returned again once stable
    append(a, b"more", mtime_ns=9_000_000_000)
    clock.advance(31)
    assert intake.poll() == []
    clock.advance(2)
    assert intake.poll() == [a]
    # pipeline moves files out; a new file with the same name is returned again
    a.unlink()
    b.unlink()
    clock.advance(31)
    assert intake.poll() == []
    write(a, b"again", mtime_ns=1_000_000_000)
    clock.advance(31)
    intake.poll()
    clock.advance(2)
    assert intake.poll() == [a]


def test_intake_growing_and_empty_files(tmp_path: Path) -> None:
    clock = FakeClock()
    intake = Intake(_settings(tmp_path, sweep_interval=1.0), clock=clock)
    g = write(tmp_path / "P1_L.jpg", b"x", mtime_ns=1)
    e = write(tmp_path / "P2_L.jpg", b"")
    assert intake.poll() == []
    for i in range(4):
        clock.advance(1.5)
        append(g, b"x", mtime_ns=2 + i)
        assert intake.poll() == []
    clock.advance(2.0)
    assert intake.poll() == [g]
    clock.advance(20.0)
    assert intake.poll() == [e]  # empty file reported so it can be rejected
    clock.advance(30.0)
    assert intake.poll() == []


def test_intake_vanished_pending_file_dropped(tmp_path: Path) -> None:
    clock = FakeClock()
    intake = Intake(_settings(tmp_path), clock=clock)
    p = write(tmp_path / "P1_L.jpg")
    intake.poll()
    assert p in intake.pending
    p.unlink()
    clock.advance(3)
    assert intake.poll() == []
    assert intake.pending == frozenset()


def test_intake_missing_inbox_does_not_crash(tmp_path: Path) -> None:
    intake = Intake(_settings(tmp_path / "gone"), clock=FakeClock())
    assert intake.poll() == []
    assert intake.last_sweep_error is not None


@pytest.mark.parametrize("kind", ["native", "polling"])
def test_intake_real_time_with_watcher(tmp_path: Path, kind: str) -> None:
    before = write(tmp_path / "P0_R.jpg", b"old")
    settings = _settings(tmp_path, observer=kind, poll_interval=0.05, stable_seconds=0.2, sweep_interval=60)
    got: list[Path] = []
    with Intake(settings) as intake:
        assert intake.poll() == []  # the start sweep sees the old file; no further sweep for 60 s
        assert intake.pending == {before}
        new = write(tmp_path / "P1_L.jpg", b"new")  # only the watcher can report this one
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(got) < 2:
            got += intake.poll()
            time.sleep(0.05)
        assert sorted(got) == sorted([before, new])  # sweep found the old one, watcher the new one
        for _ in range(3):
            assert intake.poll() == []
        assert intake.wait_until_stable([new], timeout=1.0) == [new]


def test_duration_text_reads_as_people_say_it():
    assert [duration_text(s) for s in (0.4, 10, 89, 90, 600, 5399, 5400, 12_600, 172_799, 172_800, -3)] == [
        "0 s", "10 s", "89 s", "2 min", "10 min", "90 min", "1.5 h", "3.5 h", "48.0 h", "2.0 days", "0 s"]


def test_a_left_behind_name_is_refused_with_its_own_age_and_the_limit(tmp_path):
    """With abandoned_after = 10 the reason read "has not changed for 0.00277778 h": the limit in odd units, not
    how long the file had lain there."""
    part = tmp_path / "scan.jpg.part"
    part.write_bytes(b"half")
    st = part.stat()
    assert stray_rejection(part, st, abandoned_after=10.0, now=st.st_mtime + 5) is None  # still young: left alone
    rejection = stray_rejection(part, st, abandoned_after=10.0, now=st.st_mtime + 3 * 3600)
    assert rejection is not None and rejection.code == RejectReason.LEFT_BEHIND
    assert "has not changed for 3.0 h (the limit, [screening] abandoned_after, is 10 s)" in rejection.message
    sidecar = tmp_path / "lonely.json"
    sidecar.write_text("{}")
    st = sidecar.stat()
    rejection = stray_rejection(sidecar, st, abandoned_after=86_400.0, now=st.st_mtime + 3 * 86_400)
    assert rejection is not None and "has not changed for 3.0 days (the limit, [screening] abandoned_after, is 24.0 h)" in rejection.message
