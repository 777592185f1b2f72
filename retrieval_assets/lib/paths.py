"""Where the project keeps its files: what the package carries, and the local data directory.

Everything the package reads ships inside it (tests/test_packaging.py runs it from a wheel):
samples, the instance and workspace files, the migrations. Only the data directory's default
depends on how it is installed: beside the checkout when run from one, else the user's data
directory.
"""

import os
from importlib.resources import files
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DATA_DIR = PACKAGE_DIR / "sample_data"
INSTANCE_DIR = PACKAGE_DIR / "instance"  # dagster.yaml and workspace.yaml (linked from the root)
MIGRATIONS_DIR = Path(str(files("retrieval_assets.migrations")))

_CHECKOUT = PACKAGE_DIR.parent
# Embedded Postgres, LanceDB and model exports live here unless RETRIEVAL_DATA_DIR says otherwise.
DEFAULT_DATA_DIR = (
    _CHECKOUT / ".data"
    if (_CHECKOUT / "pyproject.toml").is_file()
    else Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    / "retrieval_assets"
)
# Models assembled from packages (a zip split over several) are shared by every data directory.
MODEL_CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval_assets" / "models"
)


def write_text_atomically(path: Path, text: str) -> None:
    """`path` holds `text` whole or not at all: readers, in any process, never see a part."""
    import uuid

    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    partial.write_text(text)
    os.replace(partial, path)
