"""Every environment variable of the project, declared once: default, check, and how to fix it.

Resources bind these through `dg.EnvVar` (defs/resources.py, via `bind`), so Dagster resolves the
values at launch and never shows secrets. Before any work (every definitions load and every CLI
command) `check_environment` checks what the environment holds, so a bad value fails in one line
that names the variable, says what is wrong and how to fix it — not deep inside a run.
Nothing set: the embedded default. `.env.example` lists the same variables (a test keeps the two
equal).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import dagster as dg

from retrieval_assets.lib.paths import DEFAULT_DATA_DIR, SAMPLE_DATA_DIR


class ConfigError(ValueError):
    """One or more environment variables hold values the project cannot use."""


@dataclass(frozen=True)
class Setting:
    name: str
    check: Callable[[str, Mapping[str, str]], None]  # raises ValueError: what is wrong
    fix: str
    secret: bool = False


# --------------------------------------------------------------------------------- checks


def _not_blank(value: str) -> None:
    if not value.strip():
        raise ValueError("is empty (unset it for the default instead)")


def _postgres_url(value: str, _: Mapping[str, str]) -> None:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    _not_blank(value)
    scheme = value.split("://", 1)[0] if "://" in value else None
    if scheme is not None and scheme not in ("postgresql", "postgres"):
        raise ValueError(f"has scheme {scheme}://, not postgresql://")
    try:
        parts = conninfo_to_dict(value)
    except ProgrammingError as exc:
        raise ValueError(f"is not a Postgres connection string ({str(exc).strip()})") from None
    port = str(parts.get("port") or "5432")
    if not all(p.isdigit() for p in port.split(",")):
        raise ValueError(f"has port {port!r}, not a number")


def _writable_dir(value: str, _: Mapping[str, str]) -> None:
    _not_blank(value)
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError("is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot be created or written: {existing} is not a writable directory")


# Schemes lancedb.connect understands (object stores, DynamoDB-locked S3, memory).
_LANCEDB_SCHEMES = ("s3", "s3+ddb", "gs", "az", "abfs", "file", "memory")
# Brokers the celery executor is run with here (Redis) or documented for (RabbitMQ).
CELERY_BROKER_SCHEMES = ("redis", "rediss", "amqp", "pyamqp")


def _lancedb_uri(value: str, environ: Mapping[str, str]) -> None:
    _not_blank(value)
    if "://" not in value:
        _writable_dir(value, environ)
        return
    scheme = value.split("://", 1)[0]
    if scheme not in _LANCEDB_SCHEMES:
        raise ValueError(f"has scheme {scheme}://, which LanceDB does not open")


def _storage_options(value: str, environ: Mapping[str, str]) -> None:
    import json

    _not_blank(value)
    try:
        options = json.loads(value)
    except ValueError:
        raise ValueError("is not JSON") from None
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        raise ValueError("is not a JSON object whose keys and values are strings")
    if "://" not in environ.get("LANCEDB_URI", ""):
        raise ValueError("applies to object storage, but LANCEDB_URI is not an object store URI")


def _celery_broker(value: str, _: Mapping[str, str]) -> None:
    _not_blank(value)
    parts = urlsplit(value)
    if parts.scheme not in CELERY_BROKER_SCHEMES:
        raise ValueError(f"has scheme {parts.scheme or '(none)'}://, not redis:// or amqp://")
    if not parts.hostname:
        raise ValueError("names no host")
    _numeric_port(parts)


def _readable_source(value: str, _: Mapping[str, str]) -> None:
    _not_blank(value)
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError("does not exist")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise ValueError("cannot be read by this process")


def _integer(low: int, high: int) -> Callable[[str, Mapping[str, str]], None]:
    def check(value: str, _: Mapping[str, str]) -> None:
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError("is not a whole number") from None
        if not low <= number <= high:
            raise ValueError(f"is outside {low:,}..{high:,}")

    return check


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _user_id(value: str, _: Mapping[str, str]) -> None:
    _not_blank(value)
    if _CONTROL.search(value) or value != value.strip():
        raise ValueError("holds control characters or surrounding white space")
    if len(value) > 256:
        raise ValueError("is longer than 256 characters")


def _tiers(value: str, _: Mapping[str, str]) -> None:
    from retrieval_assets.lib.chunking import parse_tiers

    parse_tiers(value)


def _st_model(value: str, _: Mapping[str, str]) -> None:
    from retrieval_assets.lib.models import ModelNotAvailable, local_model_dir

    _not_blank(value)
    try:
        local_model_dir(value)
    except ModelNotAvailable as exc:
        raise ValueError(str(exc)) from None


def _fastembed_model(value: str, environ: Mapping[str, str]) -> None:
    from retrieval_assets.lib.models import ModelNotAvailable, locate_fastembed_model

    _not_blank(value)
    try:
        locate_fastembed_model(value, data_dir(environ))
    except ModelNotAvailable as exc:
        raise ValueError(str(exc)) from None


def _titan_dimensions(value: str, _: Mapping[str, str]) -> None:
    from retrieval_assets.lib.schema import validate_titan_dimensions

    validate_titan_dimensions(value.strip())


def _needs(*others: str) -> Callable[[str, Mapping[str, str]], None]:
    def check(value: str, environ: Mapping[str, str]) -> None:
        _not_blank(value)
        missing = [o for o in others if not environ.get(o, "").strip()]
        if missing:
            verb = "are" if len(missing) > 1 else "is"
            raise ValueError(f"is set but {' and '.join(missing)} {verb} not")

    return check


def _aws_profile(value: str, _: Mapping[str, str]) -> None:
    import botocore.session

    _not_blank(value)
    profiles = botocore.session.Session().available_profiles
    if value not in profiles:
        raise ValueError(f"names no profile in the AWS config (profiles: {profiles or 'none'})")


def _aws_region(value: str, _: Mapping[str, str]) -> None:
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d+", value):
        raise ValueError("is not an AWS region name such as us-east-1")


def _readable_file(value: str, _: Mapping[str, str]) -> None:
    _not_blank(value)
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError("is not a readable file")


def _http_url(value: str, _: Mapping[str, str]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an http(s):// URL with a host")
    _numeric_port(parts)


def _numeric_port(parts: SplitResult) -> None:
    try:
        parts.port
    except ValueError:
        raise ValueError("has a port that is not a number") from None


_POSTGRES_FIX = "set a URL such as postgresql://user:password@host:5432/dbname"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DATABASE_URL",
        _postgres_url,
        f"{_POSTGRES_FIX}, or unset it for the embedded server",
        secret=True,
    ),
    Setting("RETRIEVAL_DATA_DIR", _writable_dir, "point it at a writable directory"),
    Setting("LANCEDB_URI", _lancedb_uri, "set a writable directory or s3://bucket/path"),
    Setting(
        "LANCEDB_STORAGE_OPTIONS",
        _storage_options,
        'write a JSON object such as {"aws_endpoint": "https://...", "aws_region": "eu-west-1"}',
        secret=True,  # it may carry keys
    ),
    Setting("LANCEDB_KEEP_VERSIONS_MINUTES", _integer(0, 525_600), "set minutes, e.g. 60"),
    Setting("CONVERSATIONS_SOURCE", _readable_source, "point it at an export file or directory"),
    Setting("DEFAULT_USER_ID", _user_id, "set a plain id such as local-user"),
    Setting("MAX_MESSAGE_CHARS", _integer(1, 100_000_000), "set a character count, e.g. 200000"),
    Setting("CHUNK_TIERS", _tiers, "write name:max_tokens:overlap, e.g. micro:64:8,medium:240:32"),
    Setting("ST_MODEL", _st_model, "name an offline model or a local model directory"),
    Setting("FASTEMBED_MODEL", _fastembed_model, "name a cached model or a directory"),
    Setting("TITAN_DIMENSIONS", _titan_dimensions, "set 256, 512 or 1024"),
    Setting(
        "AWS_ACCESS_KEY_ID",
        _needs("AWS_SECRET_ACCESS_KEY"),
        "set both keys, or neither",
        secret=True,
    ),
    Setting(
        "AWS_SECRET_ACCESS_KEY",
        _needs("AWS_ACCESS_KEY_ID"),
        "set both keys, or neither",
        secret=True,
    ),
    Setting(
        "AWS_SESSION_TOKEN",
        _needs("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
        "set it with the keys it belongs to",
        secret=True,
    ),
    Setting("AWS_PROFILE", _aws_profile, "name a profile in ~/.aws/config, or unset it"),
    Setting(
        "AWS_WEB_IDENTITY_TOKEN_FILE", _readable_file, "point it at the token file, or unset it"
    ),
    Setting("AWS_REGION", _aws_region, "set a region such as us-east-1"),
    Setting(
        "BEDROCK_ENDPOINT_URL", _http_url, "set https://bedrock-runtime.<region>.amazonaws.com"
    ),
    Setting("BEDROCK_MAX_CONCURRENCY", _integer(1, 256), "set calls in flight, e.g. 8"),
    Setting(
        "DAGSTER_POSTGRES_URL",
        _postgres_url,
        f"{_POSTGRES_FIX}, or unset it for SQLite",
        secret=True,
    ),
    Setting(
        "CELERY_BROKER_URL",
        _celery_broker,
        "set redis://host:6379/0 (or amqp://...), or unset it to run steps on this machine",
        secret=True,
    ),
)
BY_NAME = {s.name: s for s in SETTINGS}
# Any of these makes Bedrock the real service; none: the local Bedrock-compatible endpoint.
AWS_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")


# A value that is a URL (it starts with a scheme): of a secret one, only the password is hidden.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _shown(setting: Setting, value: str) -> str:
    if not setting.secret:
        return repr(value)
    if _URL.match(value):  # keep its shape, hide the password
        from retrieval_assets.lib.connection import redacted

        return repr(redacted(value))
    return "(hidden)"


def _unquoted_secret(setting: Setting, value: str, reason: str) -> str:
    """`reason` without what `_shown` hides of a secret value: a library's message can quote the
    part of the value it failed on (libpq quotes a password holding a stray % or space)."""
    if not setting.secret:
        return reason
    from retrieval_assets.lib.connection import url_password

    shown = _shown(setting, value)
    hidden = (url_password(value) if _URL.match(value) else None) or value
    if len(hidden) > 1:
        reason = reason.replace(hidden, "***")
    return re.sub(
        r'"([^"]*)"',
        lambda m: m.group(0) if len(m.group(1)) <= 1 or m.group(1) in shown else '"***"',
        reason,
    )


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError, one line per bad variable, if any set variable holds a bad value.

    Values that passed are remembered for this process: a CLI command, its definitions load and
    its resources all ask, and the model checks look on disk."""
    environ = os.environ if environ is None else environ
    _check(tuple((s.name, environ[s.name]) for s in SETTINGS if s.name in environ))


@functools.lru_cache(maxsize=8)
def _check(values: tuple[tuple[str, str], ...]) -> None:  # a failure raises: never cached
    environ = dict(values)
    problems = []
    for name, value in values:
        setting = BY_NAME[name]
        try:
            setting.check(value, environ)
        except ValueError as exc:
            reason = _unquoted_secret(setting, value, " ".join(str(exc).split()).rstrip("."))
            fix = "" if "to fix" in reason.lower() else f"; to fix: {setting.fix}"
            problems.append(f"{setting.name}={_shown(setting, value)}: {reason}{fix}")
    if problems:
        raise ConfigError("\n".join(problems))


def is_set(name: str, environ: Mapping[str, str] | None = None) -> bool:
    assert name in BY_NAME, name
    return name in (os.environ if environ is None else environ)


def bind(name: str, default: Any) -> Any:
    """`dg.EnvVar(name)` when the variable is set (resolved by Dagster at launch), else `default`.

    dg.EnvVar has no default of its own (dagster-io/dagster#16232), and an unset one fails the
    run, so it is bound only when the variable exists."""
    return dg.EnvVar(name) if is_set(name) else default


def bind_int(name: str, default: int) -> Any:
    return dg.EnvVar.int(name) if is_set(name) else default


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """RETRIEVAL_DATA_DIR, or the default under the project."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("RETRIEVAL_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()


DEFAULT_SOURCE = str(SAMPLE_DATA_DIR)
