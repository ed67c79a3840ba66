"""The example queries in screening/db/SCHEMA.md run on both databases the product supports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from screening.db import init_db, make_engine

SCHEMA_MD = Path(__file__).resolve().parents[3] / "screening" / "db" / "SCHEMA.md"


ONLY = re.compile(r"^\s*--\s*(SQLite|PostgreSQL) only\s*$", re.M | re.I)


def _examples() -> list[tuple[str, str | None]]:
    """Each example statement, with the one backend it is written for when a ``-- SQLite only`` or
    ``-- PostgreSQL only`` line precedes it (what the two write differently, e.g. taking a JSON list apart);
    None: it runs on both."""
    blocks = re.findall(r"```sql\n(.*?)```", SCHEMA_MD.read_text(encoding="utf-8"), re.S)
    out: list[tuple[str, str | None]] = []
    for block in blocks:
        for chunk in block.split(";"):
            only = ONLY.search(chunk)
            body = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
            if body:
                out.append((body, None if only is None else only.group(1).lower()))
    return out


def test_schema_doc_has_examples():
    examples = _examples()
    assert len(examples) >= 8
    # a backend-specific example has its other-backend form: every backend gets every query
    only = [o for _, o in examples if o is not None]
    assert only.count("sqlite") == only.count("postgresql")


@pytest.mark.parametrize("index", range(len(_examples())))
def test_example_query_runs(make_db_url, db_backend, index):
    sql, only = _examples()[index]
    if only is not None and only != db_backend:
        pytest.skip(f"example {index} is the {only} form of a query whose {db_backend} form is beside it")
    engine = make_engine(make_db_url())
    init_db(engine)
    sql = sql.replace("'<sha256>'", "'" + "0" * 64 + "'")
    with engine.connect() as conn:
        conn.exec_driver_sql(sql).all()
    engine.dispose()
