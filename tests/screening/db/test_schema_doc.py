"""The example queries in screening/db/SCHEMA.md run on both databases the product supports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from screening.db import init_db, make_engine

SCHEMA_MD = Path(__file__).resolve().parents[3] / "screening" / "db" / "SCHEMA.md"


def _statements() -> list[str]:
    blocks = re.findall(r"```sql\n(.*?)```", SCHEMA_MD.read_text(encoding="utf-8"), re.S)
    out = []
    for block in blocks:
        body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
        out += [st.strip() for st in body.split(";") if st.strip()]
    return out


def test_schema_doc_has_examples():
    assert len(_statements()) >= 8


@pytest.mark.parametrize("index", range(len(_statements())))
def test_example_query_runs(db_url, index):
    engine = make_engine(db_url)
    init_db(engine)
    sql = _statements()[index].replace("'<sha256>'", "'" + "0" * 64 + "'")
    with engine.connect() as conn:
        conn.exec_driver_sql(sql).all()
    engine.dispose()
