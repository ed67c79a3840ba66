"""Concepts both packages use, each with its one owner here: hashing, atomic writes, safe names, the
fundus brightness threshold, and (re-exported from :mod:`training.labels`) the label vocabulary.

Why a module of its own: the worker, its report renderer process and training all need these, and
each used to carry its own copy (four ways to write a file atomically, three file-name sanitisers,
the threshold 12 in five files). It imports only the standard library and :mod:`training.labels`,
so the renderer process (which must stay free of torch and numpy) can use it too. It is part of
``training``'s public surface together with :mod:`training.api`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from training.labels import (
    DME_GRADES,
    DR_GRADES,
    LESION_CODES,
    LESION_KEYS,
    LESION_NAMES,
    LESIONS,
    PATHOLOGY_CODES,
)

__all__ = [
    "DME_GRADES", "DR_GRADES", "FUNDUS_THRESHOLD", "LESIONS", "LESION_CODES", "LESION_KEYS", "LESION_NAMES",
    "MAX_ID_LENGTH", "PATHOLOGY_CODES", "also_after_subcommands", "atomic_write", "atomic_write_bytes", "atomic_write_dir", "atomic_write_text",
    "fsync_dir", "is_safe_id", "safe_file_name", "safe_id", "sha256_file",
]

# ----------------------------------------------------------------------------------------------- fundus

FUNDUS_THRESHOLD = 12
"""A pixel whose brightest channel exceeds this (of 255) lies inside the camera's illuminated field;
the black surround of a fundus photo stays below it. Used to crop, to mask the contrast step and
the lesion areas, and to tell a fundus photo from other pictures (``training.data.transforms.fundus_mask``)."""

# ---------------------------------------------------------------------------------------------- hashing


def also_after_subcommands(parser: argparse.ArgumentParser, *flags: str) -> None:
    """Let the top-level options ``flags`` that take a value (e.g. ``--config``) be written after the subcommand too, as in
    ``dr-screen audit --config site.toml``: argparse takes a parser's options only before its subcommand, and the
    error it gave ("unrecognized arguments") read as if the option did not exist. Each subcommand, at every depth,
    gets a copy whose default is SUPPRESS, so the value given before the subcommand, or the default, stands unless
    given again after it. Call it once the subcommands are all added."""
    originals = [a for a in parser._actions if any(f in a.option_strings for f in flags)]
    pending = [parser]
    while pending:
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    for original in originals:
                        text = (original.help or "").replace("%(default)s", str(original.default))
                        sub.add_argument(*original.option_strings, dest=original.dest, default=argparse.SUPPRESS,
                                         help=text or None, metavar=original.metavar)
                    pending.append(sub)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-byte blocks (a photo's identity, a checkpoint's)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- safe names

MAX_ID_LENGTH = 64
_SAFE_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_ID_LENGTH}}}")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Names Windows (and so an SMB share, where clinics often keep reports/) cannot create, in any case
_RESERVED = re.compile(r"(?i)(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])")


def is_safe_id(value: object) -> bool:
    """True for 1-64 letters, digits, ``_`` or ``-``: a valid id, with no separators, no ``..``, nothing a shell
    or a URL would read differently. Its folder name is :func:`safe_id`'s (itself, but for names Windows
    reserves)."""
    return isinstance(value, str) and _SAFE_ID.fullmatch(value) is not None


def safe_id(value: str) -> str:
    """``value`` as a folder name: itself when :func:`is_safe_id` and not a name Windows reserves (``CON``,
    ``NUL``, ``COM1``, ...: such an id is valid, but its folder could not be made on a Windows disk or share),
    otherwise with every other character replaced by ``_`` (and cut to 64) plus ``-`` and 8 hex digits of its
    hash, so that two different ids such as ``a/b`` and ``a_b`` never share a folder. Raises ValueError for an
    empty id."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("the id is empty; a folder name needs at least one letter or digit")
    cleaned = _UNSAFE_ID_CHARS.sub("_", value.strip())
    if cleaned == value and len(cleaned) <= MAX_ID_LENGTH and not _RESERVED.fullmatch(cleaned):
        return cleaned
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:MAX_ID_LENGTH]}-{digest}"


_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}$")


def safe_file_name(name: str, max_length: int = 120) -> str:
    """A file name from a user reduced to something that cannot act as a path: its last component, runs of
    characters other than letters, digits, ``.``, ``_``, ``-`` replaced by ``_``, no leading dot. A name cut to
    ``max_length`` keeps its extension (``.jpg``): tools open files by it."""
    cleaned = _UNSAFE_NAME_CHARS.sub("_", os.path.basename(name)).lstrip(".")
    if len(cleaned) > max_length:
        suffix = m.group(0) if (m := _SUFFIX.search(cleaned)) and len(m.group(0)) < max_length else ""
        cleaned = cleaned[: max_length - len(suffix)] + suffix
    return cleaned or "file"


# ---------------------------------------------------------------------------------------- atomic writes


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_new(tmp: Path, final: Path) -> None:
    """Give ``tmp``'s file the name ``final`` without ever replacing an existing ``final``."""
    try:
        os.link(tmp, final)  # atomic, and fails when the name is taken
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(tmp, final)
    else:
        tmp.unlink()


def _new_temporary(final: Path) -> Path:
    """An empty, newly created file beside ``final`` for :func:`atomic_write`, created as ``open()`` creates any
    file (mode 0666, less the umask or as the folder's default ACL says): ``mkstemp``'s private 0600 hid reports,
    reason files and pictures from staff who read the shared folders as another user, and a chmod afterwards
    would narrow a default ACL's grant."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = final.parent / f".{final.stem}.{secrets.token_hex(4)}.tmp{final.suffix}"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {final} after 100 tries")


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, overwrite: bool = True, durable: bool = True,
) -> Path:
    """Publish the file ``path`` all at once, so a reader never sees it half-written.

    ``write(tmp)`` fills a temporary file in the same folder (its name ends in ``path``'s suffix, so
    writers that pick the format from the suffix work); it is then renamed over ``path``, or, with
    ``overwrite=False``, linked to it and FileExistsError raised if ``path`` already exists (an earlier
    version is never replaced). ``durable`` fsyncs the file and the folder, so the new content survives
    a power cut once this returns. The temporary file is removed on any failure. The file gets the mode a
    plainly created one would (:func:`_new_temporary`).
    """
    final = Path(path)
    tmp = _new_temporary(final)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, final)
        else:
            _link_new(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(final.parent)
    return final


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True, durable: bool = True) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, durable=durable)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True, durable: bool = True) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite, durable=durable)


def atomic_write_dir(path: str | os.PathLike[str], fill: Callable[[Path], object]) -> Path:
    """Publish the folder ``path`` with all its files at once: ``fill(tmp)`` writes them into ``<path>.tmp``,
    which is then renamed to ``path``. An existing ``path`` is removed just before the rename (a folder
    cannot be renamed over a non-empty one), so a reader sees the old files, briefly none, then the new."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted earlier attempt
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
