"""Alembic environment and revisions (shipped in the wheel as retrieval_assets.migrations)."""
