"""The test suite; PROJECT_ROOT is the checkout it tests (the package never reads it)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
