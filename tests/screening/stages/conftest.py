"""Every stage records what it does in the database (commit before move): the stage tests run on SQLite and on
PostgreSQL."""

from __future__ import annotations

import pytest

from screening.config import ScreeningSettings


@pytest.fixture
def settings(settings: ScreeningSettings, db_url: str) -> ScreeningSettings:
    """The parent ``settings`` on each supported database: the SQLite file, then a PostgreSQL database."""
    return settings.model_copy(update={"database": db_url})
