"""Pages of multi-page files: images.page and images.file_sha256.

Revision ID: 0009_pages
Revises: 0005_gradability_laterality
Create Date: 2026-12-02

Written after 0006_hardening and chained after 0005_gradability_laterality when main (issue 13a) was merged into its
branch (the id is descriptive, not an order).

Why: a multi-page TIFF holding several photos was refused as a whole; now each page that is a fundus photo is
an image of its own (through the intake checks like any photo: graded, or stored as ungradable) and each page
that is not is a rejected image, while the file is one
drop and is archived once. ``page`` is the page's number in the file (1 = its first directory, thumbnails
counted), ``file_sha256`` the hash of the whole file, which the drop carries; both stay NULL for the images of
single-picture files, so every row written before keeps its meaning. Frozen: this file must not follow later
model edits.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_pages"
down_revision = "0005_gradability_laterality"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("page", sa.Integer(), nullable=True))
    op.add_column("images", sa.Column("file_sha256", sa.String(length=64), nullable=True))
    op.create_index("ix_images_file_sha256", "images", ["file_sha256"])


def downgrade() -> None:
    # plain DROP COLUMN (SQLite >= 3.35), as in 0002: a batch rebuild of images would trip the foreign keys. The
    # index goes first: SQLite refuses to drop a column an index uses.
    op.drop_index("ix_images_file_sha256", table_name="images")
    op.drop_column("images", "file_sha256")
    op.drop_column("images", "page")
