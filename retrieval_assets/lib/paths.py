"""Where the project keeps its files: samples, SQL, migrations and the local data directory."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = PACKAGE_DIR.parent
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"
SQL_DIR = PROJECT_ROOT / "sql"
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"
ALEMBIC_INI = PROJECT_ROOT / "alembic.ini"
# Embedded Postgres, LanceDB and model exports live here unless configured elsewhere.
DEFAULT_DATA_DIR = PROJECT_ROOT / ".data"
