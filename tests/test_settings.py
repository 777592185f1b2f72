"""Every environment variable, checked before any work (lib/settings.py).

A bad value stops every command and the definitions load in one line that names the variable,
says what is wrong and how to fix it, shows no secret, and leaves nothing behind. Every variable
set to a valid non-default value at once (a production-like deployment: its own databases,
migrated with Alembic, Bedrock through an endpoint URL under AWS keys) runs the whole graph and
every command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psutil
import psycopg
import pytest

from retrieval_assets import cli
from retrieval_assets.defs.resources import resources_from_environment
from retrieval_assets.lib import step_server
from retrieval_assets.lib.models import local_model_dir
from retrieval_assets.lib.onnx_export import EXPORTS_DIR, export_folder
from retrieval_assets.lib.paths import SAMPLE_DATA_DIR
from retrieval_assets.lib.schema import TITAN_MODEL_ID
from retrieval_assets.lib.settings import SETTINGS, ConfigError, check_environment
from tests import PROJECT_ROOT
from tests.services import (
    AWS_FILES,
    S3_KEYS,
    ObjectStore,
    clean_environ,
    database_on,
    free_port,
    stop,
)

NAMES = {s.name for s in SETTINGS}
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Bad:
    name: str
    value: str  # "{tmp}" stands for the test's tmp_path
    wrong: str  # what the line must say is wrong
    secrets: tuple[str, ...] = ()  # must appear nowhere in the output

    @property
    def id(self) -> str:
        return f"{self.name}={self.value[:24]!r}"


INVALID = (
    Bad("DATABASE_URL", "mysql://u:Hunter2-db-pw@h/d", "scheme mysql://", ("Hunter2-db-pw",)),
    Bad("DATABASE_URL", "not a url", "not a Postgres connection string", ("not a url",)),
    # libpq quotes the fragment it fails on: here, the password
    Bad("DATABASE_URL", "postgresql://u:pw%zz-4real@h/d", "percent-encoded", ("pw%zz-4real",)),
    Bad("DATABASE_URL", "postgresql://u:pass word 9@h/d", "spaces", ("pass word 9",)),
    Bad("DATABASE_URL", "postgresql://u:Hunter2-db-pw@h:54x/d", "port '54x'", ("Hunter2-db-pw",)),
    Bad("DATABASE_URL", "", "is empty"),
    Bad("RETRIEVAL_DATA_DIR", "{tmp}/a-file", "is a file"),
    Bad("LANCEDB_URI", "ftp://x", "scheme ftp://"),
    Bad("LANCEDB_URI", "{tmp}/a-file", "is a file"),
    Bad(
        "LANCEDB_STORAGE_OPTIONS",
        '{"aws_secret_access_key": "Planted-s3-secret-77"',
        "is not JSON",
        ("Planted-s3-secret-77",),
    ),
    Bad("LANCEDB_STORAGE_OPTIONS", '{"allow_http": true}', "keys and values are strings"),
    Bad("LANCEDB_STORAGE_OPTIONS", '{"aws_region": "eu-west-1"}', "not an object store URI"),
    Bad("LANCEDB_KEEP_VERSIONS_MINUTES", "-1", "outside 0..525,600"),
    Bad("LANCEDB_KEEP_VERSIONS_MINUTES", "an hour", "not a whole number"),
    Bad("CONVERSATIONS_SOURCE", "/nonexistent", "does not exist"),
    Bad("DEFAULT_USER_ID", "user\x07bell", "control characters"),
    Bad("DEFAULT_USER_ID", " padded", "white space"),
    Bad("MAX_MESSAGE_CHARS", "0", "outside 1..100,000,000"),
    Bad("MAX_MESSAGE_CHARS", "1e5", "not a whole number"),
    Bad("CHUNK_TIERS", "garbage", "expected name:max_tokens:overlap"),
    Bad("CHUNK_TIERS", "micro:64:8,micro:32:4", "each once"),
    Bad("ST_MODEL", "nope/nope", "not available offline"),
    Bad("FASTEMBED_MODEL", "BAAI/bge-small-en-v1.5", "not in the local FastEmbed cache"),
    Bad("TITAN_DIMENSIONS", "768", "must be one of 256, 512, 1024"),
    Bad("TITAN_DIMENSIONS", "abc", "must be one of 256, 512, 1024"),
    Bad(
        "AWS_ACCESS_KEY_ID",
        "AKIAPLANTEDKEY000001",
        "AWS_SECRET_ACCESS_KEY is not",
        ("AKIAPLANTEDKEY000001",),
    ),
    Bad(
        "AWS_SECRET_ACCESS_KEY",
        "planted-secret-0a1b2c3d",
        "AWS_ACCESS_KEY_ID is not",
        ("planted-secret-0a1b2c3d",),
    ),
    Bad(
        "AWS_SESSION_TOKEN",
        "planted-token-9f8e7d",
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not",
        ("planted-token-9f8e7d",),
    ),
    Bad("AWS_PROFILE", "nosuchprofile", "names no profile"),
    Bad("AWS_WEB_IDENTITY_TOKEN_FILE", "/nonexistent", "not a readable file"),
    Bad("AWS_REGION", "mars", "not an AWS region name"),
    Bad("BEDROCK_ENDPOINT_URL", "ftp://x", "not an http(s):// URL"),
    Bad("BEDROCK_ENDPOINT_URL", "http://127.0.0.1:port", "port that is not a number"),
    Bad("BEDROCK_MAX_CONCURRENCY", "0", "outside 1..256"),
    Bad("DAGSTER_POSTGRES_URL", "garbage", "not a Postgres connection string"),
    Bad(
        "DAGSTER_POSTGRES_URL",
        "postgresql://dagster:Dagster-pw-55@db:5x/dagster",
        "port '5x'",
        ("Dagster-pw-55",),
    ),
    Bad("CELERY_BROKER_URL", "http://broker:6379/0", "scheme http://"),
    Bad(
        "CELERY_BROKER_URL",
        "redis://:Celery-pw-31@broker:63x9/0",
        "port that is not a number",
        ("Celery-pw-31",),
    ),
)
COMMANDS = (["run"], ["status"], ["search", "x"], ["search", "--store", "postgres", "x"])


def test_env_example_lists_every_setting_and_nothing_else():
    text = (PROJECT_ROOT / ".env.example").read_text()
    listed = re.findall(r"^(?:#\s*)?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)
    assert len(listed) == len(set(listed)), "a variable is listed twice"
    assert set(listed) == NAMES


def test_the_invalid_matrix_covers_every_setting():
    assert {bad.name for bad in INVALID} == NAMES


@dataclass(frozen=True)
class Isolated:
    data_dir: Path  # RETRIEVAL_DATA_DIR, empty
    dagster_home: Path  # DAGSTER_HOME, not created
    tmp: Path


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Isolated:
    """No setting of the machine's; an empty data directory and a DAGSTER_HOME not yet made."""
    for name in (*NAMES, *AWS_FILES):
        monkeypatch.delenv(name, raising=False)
    for name in AWS_FILES:  # no ~/.aws of the machine's decides the AWS_PROFILE check
        monkeypatch.setenv(name, str(tmp_path / "aws" / name.lower()))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("RETRIEVAL_DATA_DIR", str(data_dir))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster-home"))
    (tmp_path / "a-file").write_text("not a directory\n")
    return Isolated(data_dir, tmp_path / "dagster-home", tmp_path)


def set_bad(bad: Bad, isolated: Isolated, monkeypatch: pytest.MonkeyPatch) -> str:
    value = bad.value.replace("{tmp}", str(isolated.tmp))
    monkeypatch.setenv(bad.name, value)
    return value


def assert_one_line(message: str, bad: Bad, value: str) -> None:
    """The line names the variable, says what is wrong and how to fix it, and hides secrets."""
    assert "\n" not in message, message
    assert message.startswith(f"{bad.name}="), message
    assert bad.wrong in message, message
    assert "to fix" in message.lower(), message
    for secret in bad.secrets:
        assert secret not in message, message
    if bad.secrets and "://" not in value:
        assert f"{bad.name}=(hidden)" in message, message


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize("bad", INVALID, ids=lambda bad: bad.id)
def test_a_bad_value_stops_every_command_in_one_line_before_any_work(
    bad: Bad, command: list[str], isolated: Isolated, monkeypatch, capsys
):
    value = set_bad(bad, isolated, monkeypatch)
    code = cli.main(command)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("configuration error: "), err
    assert_one_line(err.removeprefix("configuration error: ").rstrip("\n"), bad, value)
    # Nothing was done: no instance written, no embedded server, LanceDB or model export made.
    assert not isolated.dagster_home.exists()
    assert list(isolated.data_dir.iterdir()) == []
    assert (isolated.tmp / "a-file").read_text() == "not a directory\n"


@pytest.mark.parametrize(
    "command", [["status"], ["search", "--store", "postgres", "x"]], ids=" ".join
)
def test_an_unreachable_database_is_one_line_naming_the_variable(
    command: list[str], isolated: Isolated, monkeypatch, capsys
):
    # Well-formed, so it passes the check; nothing listens on port 1.
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret-pw@127.0.0.1:1/db")
    code = cli.main(command)
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: cannot connect to the database of DATABASE_URL"), err
    assert "s3cret-pw" not in err + out


@pytest.mark.parametrize("bad", INVALID, ids=lambda bad: bad.id)
def test_a_bad_value_fails_the_definitions_load(bad: Bad, isolated: Isolated, monkeypatch):
    value = set_bad(bad, isolated, monkeypatch)
    with pytest.raises(ConfigError) as raised:
        resources_from_environment()
    assert_one_line(str(raised.value), bad, value)


def test_every_bad_variable_gets_its_own_line(isolated: Isolated, monkeypatch):
    monkeypatch.setenv("TITAN_DIMENSIONS", "768")
    monkeypatch.setenv("MAX_MESSAGE_CHARS", "0")
    monkeypatch.setenv("AWS_REGION", "mars")
    with pytest.raises(ConfigError) as raised:
        check_environment()
    lines = str(raised.value).splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "MAX_MESSAGE_CHARS",
        "TITAN_DIMENSIONS",
        "AWS_REGION",
    ]
    assert all("; to fix: " in line for line in lines)


# ---------------------------------------------------------------------- through the real tools


def run_tool(
    args: list[str], env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout
    )


def tool_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """A clean environment with an instance of its own, plus `settings`."""
    home = tmp_path / "dagster-home"
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(cli.instance_yaml(str(home), settings))
    return {
        **clean_environ(),
        "DAGSTER_HOME": str(home),
        "RETRIEVAL_DATA_DIR": str(tmp_path / "data"),
        **settings,
    }


def validate(env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_tool(
        [str(BIN / "dagster"), "definitions", "validate", "-m", "retrieval_assets.definitions"],
        env,
    )


def test_dagster_definitions_validate_refuses_a_bad_value_in_its_one_line(tmp_path):
    bad = validate(tool_env(tmp_path, TITAN_DIMENSIONS="768"))
    assert bad.returncode != 0
    expected = (
        "TITAN_DIMENSIONS='768': Titan Text Embeddings v2 dimensions must be one of 256, 512, "
        "1024; got '768'; to fix: set 256, 512 or 1024"
    )
    assert any(line.endswith(expected) for line in (bad.stdout + bad.stderr).splitlines())
    good = validate(tool_env(tmp_path, TITAN_DIMENSIONS="512"))
    assert good.returncode == 0, good.stdout + good.stderr


def test_the_installed_command_refuses_a_bad_value_in_one_line(tmp_path):
    out = run_tool(
        [str(BIN / "retrieval-assets"), "status"],
        tool_env(tmp_path, DATABASE_URL="mysql://u:Hunter2-db-pw@h/d"),
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.splitlines() == [
        "configuration error: DATABASE_URL='mysql://u:***@h/d': has scheme mysql://, not "
        "postgresql://; to fix: set a URL such as postgresql://user:password@host:5432/dbname, "
        "or unset it for the embedded server"
    ]
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------------------------ valid values

MODEL_DIR = str(local_model_dir("sentence-transformers/all-MiniLM-L6-v2"))


def test_aws_profile_and_web_identity_are_accepted_and_select_bedrock(
    isolated: Isolated, monkeypatch
):
    config = isolated.tmp / "aws-config"
    config.write_text("[profile prod]\nregion = eu-west-1\n")
    token = isolated.tmp / "web-identity-token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.planted.token\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for name, value in (("AWS_PROFILE", "prod"), ("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))):
        with monkeypatch.context() as scoped:
            scoped.setenv(name, value)
            check_environment()
            bound = resources_from_environment()["titan_model"]
            with dg.build_resources({"titan_model": bound}) as resources:
                bedrock = resources.titan_model
            assert not bedrock.is_local and bedrock.label == TITAN_MODEL_ID
            assert bedrock.profile_name == (value if name == "AWS_PROFILE" else None)
    # and through the real tool, both at once
    env = tool_env(
        isolated.tmp,
        AWS_CONFIG_FILE=str(config),
        AWS_PROFILE="prod",
        AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
        AWS_ROLE_ARN="arn:aws:iam::123456789012:role/retrieval",
    )
    out = validate(env)
    assert out.returncode == 0, out.stdout + out.stderr


def production_settings(
    root: Path, database_url: str, dagster_url: str, endpoint: str, store: ObjectStore
) -> dict:
    """Every setting but AWS_PROFILE and AWS_WEB_IDENTITY_TOKEN_FILE (the keys stand for them)
    and CELERY_BROKER_URL (tests/test_celery.py runs the steps on celery workers), each a valid
    value other than its default. LanceDB is on object storage (`store`)."""
    source = root / "exports"
    if not source.exists():
        shutil.copytree(SAMPLE_DATA_DIR, source)
        # Within the default limit of 200,000 characters, over MAX_MESSAGE_CHARS: skipped.
        long = [("user", "How long can a message be?"), ("assistant", "overlong " * 15_000)]
        (source / "long.jsonl").write_text(
            "".join(
                json.dumps({"conversation_id": "long-1", "role": r, "content": c}) + "\n"
                for r, c in long
            )
        )
    return {
        "DATABASE_URL": database_url,
        "RETRIEVAL_DATA_DIR": str(root / "data"),
        "LANCEDB_URI": store.uri("prod"),
        "LANCEDB_STORAGE_OPTIONS": store.storage_options,
        "LANCEDB_KEEP_VERSIONS_MINUTES": "30",
        "CONVERSATIONS_SOURCE": str(source),
        "DEFAULT_USER_ID": "prod-user",
        "MAX_MESSAGE_CHARS": "100000",
        "CHUNK_TIERS": "micro:64:8,medium:240:32",
        "ST_MODEL": MODEL_DIR,  # a directory: the path branch of the model lookup
        "FASTEMBED_MODEL": MODEL_DIR,
        "TITAN_DIMENSIONS": "512",
        "AWS_ACCESS_KEY_ID": "AKIAPRODTESTKEY00001",
        "AWS_SECRET_ACCESS_KEY": "prod-test-secret-5e6f7a8b",
        "AWS_SESSION_TOKEN": "prod-test-session-1c2d3e",
        "AWS_REGION": "eu-west-1",
        "BEDROCK_ENDPOINT_URL": endpoint,
        "BEDROCK_MAX_CONCURRENCY": "4",
        "DAGSTER_POSTGRES_URL": dagster_url,
    }


def test_production_values_pass_the_check(tmp_path):
    settings = production_settings(
        tmp_path,
        "postgresql://app:pw@db.internal:6543/postgres",
        "postgresql://dagster:pw@db.internal:5432/dagster",
        "https://bedrock-runtime.eu-west-1.amazonaws.com",
        ObjectStore("https://s3.eu-west-1.amazonaws.com", "retrieval-prod"),
    )
    assert set(settings) == NAMES - {
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "CELERY_BROKER_URL",
    }
    check_environment({**clean_environ(), **settings})


# ------------------------------------------------------------- a production-like deployment


@pytest.fixture(scope="module")
def bedrock_endpoint(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """The Bedrock-compatible endpoint in a process of its own (as Bedrock is), answering with
    vectors of the packaged model; stopped at the end whatever happened."""
    import boto3
    from botocore.config import Config

    root = tmp_path_factory.mktemp("production")
    port = free_port()
    log = (root / "endpoint.log").open("w")
    env = {**clean_environ(), "RETRIEVAL_DATA_DIR": str(root / "data")}
    server = subprocess.Popen(
        [sys.executable, "-m", "retrieval_assets.lib.bedrock_emulator", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert "local Bedrock endpoint on" in server.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        # The first call loads (and exports) the model: the endpoint answers once that is done.
        client = boto3.client(
            "bedrock-runtime",
            region_name="eu-west-1",
            endpoint_url=url,
            aws_access_key_id="warm-up",
            aws_secret_access_key="warm-up",
            config=Config(read_timeout=600, retries={"total_max_attempts": 1}),
        )
        answer = client.invoke_model(
            modelId=TITAN_MODEL_ID, body=json.dumps({"inputText": "warm up", "dimensions": 512})
        )
        assert len(json.loads(answer["body"].read())["embedding"]) == 512
        yield url, root
    finally:
        stop(server)
        log.close()


@dataclass(frozen=True)
class Deployment:
    env: dict[str, str]
    settings: dict[str, str]
    run: subprocess.CompletedProcess
    store: ObjectStore


@pytest.fixture(scope="module")
def production(pg_url: str, bedrock_endpoint, object_store: ObjectStore) -> Deployment:
    """Every setting at a production-like value (LanceDB on an S3-compatible server); the schema
    migrated the production way (Alembic, before anything runs); then `retrieval-assets run`."""
    endpoint, root = bedrock_endpoint
    # The server trusts local connections: a password in the URL is accepted, and planted.
    database_url = database_on(pg_url, "prod_test").replace(
        "postgres:@", f"postgres:{DB_PASSWORD}@"
    )
    assert DB_PASSWORD in database_url
    settings = production_settings(
        root,
        database_url,
        database_on(pg_url, "prod_dagster"),
        endpoint,
        object_store,
    )
    home = root / "dagster-home"
    env = {**clean_environ(), **settings, "DAGSTER_HOME": str(home)}
    migrate = run_tool(
        [str(BIN / "alembic"), "upgrade", "head"],
        {
            **clean_environ(),
            "DATABASE_URL": settings["DATABASE_URL"],
            "TITAN_DIMENSIONS": "512",
        },
    )
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    run = run_tool([str(BIN / "retrieval-assets"), "run"], env, timeout=1200)
    return Deployment(env, settings, run, object_store)


def output_of(out: subprocess.CompletedProcess) -> str:
    return f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


DB_PASSWORD = "planted-db-password-77aa"
# Every secret the production deployment holds: AWS keys, the database password, LanceDB's keys.
SECRETS = (
    "AKIAPRODTESTKEY00001",
    "prod-test-secret-5e6f7a8b",
    "prod-test-session-1c2d3e",
    DB_PASSWORD,
    S3_KEYS["aws_secret_access_key"],
)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, (
                f"a secret leaked: ...{text[text.index(secret) - 200 :][:400]}"
            )


@pytest.mark.slow
def test_production_run_succeeds(production: Deployment):
    assert production.run.returncode == 0, output_of(production.run)
    assert "retrieval_job: succeeded" in production.run.stdout
    assert "FAILED" not in production.run.stdout
    assert_no_secret(production.run.stdout, production.run.stderr)
    # The runs are in the Postgres instance storage, not SQLite under DAGSTER_HOME.
    with psycopg.connect(production.settings["DAGSTER_POSTGRES_URL"]) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] >= 1
    assert not list(Path(production.env["DAGSTER_HOME"]).rglob("*.db"))


@pytest.mark.slow
def test_production_secrets_never_reach_logs_metadata_or_the_instance(
    production: Deployment, monkeypatch: pytest.MonkeyPatch
):
    """What the run wrote (its output, the instance's run config, tags, event log messages and
    materialization metadata, the files under DAGSTER_HOME) holds none of the secrets."""
    seen = [production.run.stdout, production.run.stderr]
    home = Path(production.env["DAGSTER_HOME"])
    # The instance reads its Postgres storage from the environment, as the run did.
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", production.settings["DAGSTER_POSTGRES_URL"])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.get_runs()
        assert records
        for record in records:
            seen.append(json.dumps(record.run_config, default=str))
            seen.append(json.dumps(record.tags))
            for entry in instance.all_logs(record.run_id):
                seen.append(entry.message or "")
                event = entry.dagster_event
                if event is not None and event.is_step_materialization:
                    metadata = event.step_materialization_data.materialization.metadata
                    seen.extend(str(v.value) for v in metadata.values())
    seen.extend(
        p.read_text(errors="replace")
        for p in home.rglob("*")
        if p.is_file() and p.suffix in (".out", ".err", ".complete", ".log", ".yaml")
    )
    # The scan saw the runs' metadata: the Titan vectors came from "Amazon Bedrock" (the endpoint
    # stood in for it under the planted credentials).
    assert any(t == "Amazon Bedrock" for t in seen) and any("titan batch" in t for t in seen)
    assert_no_secret(*seen)


@pytest.mark.slow
def test_production_data_follows_every_setting(production: Deployment):
    assert production.run.returncode == 0, output_of(production.run)
    settings = production.settings
    with psycopg.connect(settings["DATABASE_URL"]) as conn:
        dims = conn.execute(
            "SELECT DISTINCT vector_dims(embedding::vector), embedding_model "
            "FROM conversation_chunks"
        ).fetchall()
        tiers = {r[0] for r in conn.execute("SELECT DISTINCT tier FROM conversation_chunks")}
        users = dict(
            conn.execute(
                "SELECT source_format, array_agg(DISTINCT user_id) FROM conversations "
                "GROUP BY source_format"
            ).fetchall()
        )
        columns = set(
            conn.execute(
                "SELECT store, column_name, model, dims FROM embedding_schema_versions "
                "WHERE retired_at IS NULL"
            ).fetchall()
        )
        overlong, asked = conn.execute(
            "SELECT count(*) FILTER (WHERE content LIKE '%overlong overlong%'), "
            "count(*) FILTER (WHERE content LIKE '%How long can a message be?%') "
            "FROM conversation_chunks"
        ).fetchone()
    assert dims == [(512, TITAN_MODEL_ID)]  # every chunk, from "Amazon Bedrock", 512 dims
    assert columns == {
        ("postgres", "embedding", TITAN_MODEL_ID, 512),
        ("lancedb", "vector_coarse", f"fastembed:{MODEL_DIR}", 384),
        ("lancedb", "vector_fine", f"sentence-transformers:{MODEL_DIR}", 384),
    }
    assert asked > 0 and overlong == 0  # read, without the message over MAX_MESSAGE_CHARS
    assert tiers == {"micro", "medium"}
    # The ChatGPT, ShareGPT and long.jsonl exports name no user: DEFAULT_USER_ID.
    assert users == {
        "chatgpt": ["prod-user"],
        "sharegpt": ["prod-user"],
        "jsonl": ["prod-user", "sample-user-jsonl"],
        "claude": ["sample-user-claude"],
    }
    # LanceDB at LANCEDB_URI, in the bucket, not under RETRIEVAL_DATA_DIR; its search snapshot
    # on this machine, under the data directory
    data_dir = Path(settings["RETRIEVAL_DATA_DIR"])
    bucket, prefix = settings["LANCEDB_URI"].removeprefix("s3://").split("/", 1)
    listed = production.store.client().list_objects_v2(
        Bucket=bucket, Prefix=f"{prefix}/conversation_chunks.lance/_versions/"
    )
    assert listed["KeyCount"] > 0
    assert not (data_dir / "lancedb").exists()
    assert list((data_dir / "search_snapshot").glob("*/*/coarse.npy"))
    assert not (data_dir / "pg").exists()  # no embedded server
    # The model exports are the machine's (one per model), not the data directory's.
    assert not (data_dir / "onnx").exists()
    assert (EXPORTS_DIR / export_folder(MODEL_DIR) / "model.onnx").is_file()


@pytest.mark.slow
def test_production_status(production: Deployment):
    out = run_tool([str(BIN / "retrieval-assets"), "status"], production.env)
    assert out.returncode == 0, output_of(out)
    found = re.search(
        r"^postgres: (\d+) conversations, (\d+) chunks, (\d+) without a Titan vector$",
        out.stdout,
        flags=re.MULTILINE,
    )
    assert found, out.stdout
    conversations, chunks, missing = map(int, found.groups())
    assert conversations > 0 and chunks > 0 and missing == 0
    lance = re.search(r"^lancedb:\s+(\d+) chunks at (.+)$", out.stdout, flags=re.MULTILINE)
    assert lance, out.stdout
    assert int(lance.group(1)) == chunks
    assert lance.group(2) == production.settings["LANCEDB_URI"]


QUERY = "my child has a fever, should I worry"


def search(production: Deployment, *args: str) -> subprocess.CompletedProcess:
    return run_tool([str(BIN / "retrieval-assets"), "search", *args, QUERY], production.env)


def hits(stdout: str) -> list[tuple[str, str]]:
    """(rank line, text line) of each result printed."""
    return re.findall(r"^( ?\d+\. .*)\n    (.*)$", stdout, flags=re.MULTILINE)


@pytest.mark.slow
def test_production_search_in_lancedb(production: Deployment):
    out = search(production)
    assert out.returncode == 0, output_of(out)
    found = hits(out.stdout)
    assert len(found) == 5, out.stdout
    assert "fever" in found[0][1].lower(), out.stdout


@pytest.mark.parametrize("store", ["lancedb", "postgres"])
def test_a_search_that_matches_nothing_says_what_it_searched(production: Deployment, store):
    """Lexical, for a user with no chunks: no results, and the message names the user and the
    store rather than suggesting the graph never ran."""
    out = search(production, "--mode", "lexical", "--store", store, "--user", "nobody-here")
    assert out.returncode == 1, output_of(out)
    assert out.stdout.strip() == (
        f"no results: no chunk of user 'nobody-here' matched in {store} "
        "(`retrieval-assets status` shows what each store holds)"
    )


def test_search_into_a_closed_pipe_stops_quietly(production: Deployment):
    """`search ... | head -1`: the reader is gone before the results are written (here before they
    are found): no error message, the exit status of a tool SIGPIPE stopped. Lexical, so
    that no model is loaded for it."""
    found = subprocess.Popen(
        [str(BIN / "retrieval-assets"), "search", "--mode", "lexical", QUERY],
        env=production.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert found.stdout is not None
    found.stdout.close()
    _, err = found.communicate(timeout=300)
    assert found.returncode == 141, err[-3000:]
    assert "error" not in err.lower() and "Traceback" not in err, err[-3000:]


@pytest.mark.parametrize("mode", ["hybrid", "lexical"])
def test_a_search_before_any_run_says_so_and_creates_nothing(tmp_path, mode):
    """A new user's first command may be a search: it says there is nothing yet (before loading
    a model), and leaves the store as it found it (no empty chunk table)."""
    env = tool_env(tmp_path)
    out = run_tool([str(BIN / "retrieval-assets"), "search", "--mode", mode, QUERY], env)
    assert out.returncode == 1, output_of(out)
    lancedb_dir = tmp_path / "data" / "lancedb"
    assert f"nothing to search yet: LanceDB at {lancedb_dir} has no chunks" in out.stderr
    assert "run `retrieval-assets run` first" in out.stderr
    assert "Traceback" not in out.stderr and not out.stdout
    assert not list(lancedb_dir.glob("*.lance"))


def test_the_command_exits_with_its_status_after_its_exit_handlers_and_output(tmp_path):
    """The command skips the interpreter's teardown (cli.console_main), not the exit handlers
    or buffered output: a handler's print to a pipe (block-buffered) arrives, and the status
    is the command's."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('exit handlers ran'))\n"
        "from retrieval_assets.cli import console_main\n"
        "sys.argv[1:] = ['search', '--mode', 'lexical', 'anything']\n"
        "console_main()\n"
    )
    out = run_tool([sys.executable, "-c", code], tool_env(tmp_path))
    assert out.returncode == 1, output_of(out)
    assert "nothing to search yet" in out.stderr
    assert out.stdout == "exit handlers ran\n"


def test_the_step_forkserver_leaves_without_the_teardown_once_its_command_is_gone(tmp_path):
    """The forkserver the steps fork from (step_server.PRELOAD) exits without the interpreter's
    teardown (lib/quick_exit.py), which otherwise held the command's output open for seconds
    after it exited: an exit handler of a module preloaded before it never runs. Without
    PRELOAD, the same handler runs (the control)."""
    (tmp_path / "late_handler.py").write_text(
        "import atexit, os, pathlib\natexit.register(pathlib.Path(os.environ['MARKER']).touch)\n"
    )
    code = (
        "import sys\n"
        "from multiprocessing import forkserver\n"
        "from retrieval_assets.lib.step_server import PRELOAD\n"
        "forkserver.set_forkserver_preload(['late_handler', *PRELOAD[: int(sys.argv[1])]])\n"
        "forkserver.ensure_running()\n"
        "print(forkserver._forkserver._forkserver_pid)\n"
    )
    env = {**tool_env(tmp_path), "PYTHONPATH": f"{tmp_path}:{PROJECT_ROOT}"}
    ran = {}
    for preloads in (len(step_server.PRELOAD), 0):
        marker = tmp_path / f"teardown-{preloads}"
        out = run_tool([sys.executable, "-c", code, str(preloads)], {**env, "MARKER": str(marker)})
        assert out.returncode == 0, output_of(out)
        server = int(out.stdout)
        deadline = time.monotonic() + 120
        while psutil.pid_exists(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not psutil.pid_exists(server), "the forkserver outlived its command"
        ran[preloads] = marker.exists()
    assert ran == {len(step_server.PRELOAD): False, 0: True}


@pytest.mark.slow
def test_production_search_in_postgres_uses_titan(production: Deployment):
    out = search(production, "--store", "postgres", "--mode", "dense")
    assert out.returncode == 0, output_of(out)
    found = hits(out.stdout)
    assert len(found) == 5, out.stdout
    # AWS keys are set: the vectors are Titan's (through BEDROCK_ENDPOINT_URL), not the
    # local endpoint's.
    assert all(f"(titan: {TITAN_MODEL_ID})" in line for line, _ in found), out.stdout
    assert "local-bedrock-endpoint" not in out.stdout
    assert "fever" in found[0][1].lower(), out.stdout
    hybrid = search(production, "--store", "postgres")  # the default mode
    assert hybrid.returncode == 0, output_of(hybrid)
    fused = hits(hybrid.stdout)
    assert len(fused) == 5 and all("(hybrid" in line for line, _ in fused), hybrid.stdout
    assert all(TITAN_MODEL_ID in line for line, _ in fused if "dense -" not in line)
    assert "fever" in fused[0][1].lower(), hybrid.stdout
    assert_no_secret(out.stdout, out.stderr, hybrid.stdout, hybrid.stderr)


@pytest.mark.slow
def test_production_quality_canary_asks_as_the_default_user(production: Deployment, monkeypatch):
    """The nightly consistency job's retrieval_quality check, under DEFAULT_USER_ID=prod-user:
    the samples' records that name no user are prod-user's, and the canary asks as prod-user
    (asked as local-user, half its probes found nothing: a warning for a setting, not search)."""
    job = ["-m", "retrieval_assets.definitions", "-j", "consistency_check_job"]
    out = run_tool([str(BIN / "dagster"), "job", "execute", *job], production.env, timeout=900)
    assert out.returncode == 0, output_of(out)
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", production.settings["DAGSTER_POSTGRES_URL"])
    instance = dg.DagsterInstance.from_config(production.env["DAGSTER_HOME"])
    run = instance.get_runs(limit=1)[0]
    assert run.job_name == "consistency_check_job" and run.is_success
    (quality,) = [
        e.dagster_event.event_specific_data
        for e in instance.all_logs(run.run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.dagster_event.event_specific_data.check_name == "retrieval_quality"
    ]  # fmt: skip
    found = {k: v.value for k, v in quality.metadata.items()}
    assert found["lancedb_hybrid_hit_at_5"] == found["postgres_hybrid_hit_at_5"] == 1.0, found
    assert quality.passed, found


@pytest.mark.slow
def test_production_definitions_validate(production: Deployment):
    out = validate(production.env)
    assert out.returncode == 0, output_of(out)


def test_celery_broker_url_selects_the_celery_executor(isolated: Isolated, monkeypatch):
    """Set: every job's steps go to celery workers (tests/test_celery.py runs them); unset: the
    multiprocess executor. Through a definitions load here and through the real tool."""
    from retrieval_assets.definitions import build_definitions

    broker = "redis://:Celery-pw-42@broker.internal:6379/0"
    for value, executor in ((None, "multiprocess"), (broker, "celery")):
        with monkeypatch.context() as scoped:
            if value is not None:
                scoped.setenv("CELERY_BROKER_URL", value)
            build_definitions.cache_clear()
            try:
                jobs = build_definitions().resolve_all_job_defs()
            finally:
                build_definitions.cache_clear()
            assert {job.executor_def.name for job in jobs} == {executor}
    out = validate(tool_env(isolated.tmp, CELERY_BROKER_URL=broker))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Celery-pw-42" not in out.stdout + out.stderr
    # the worker command needs it
    unset = run_tool([str(BIN / "retrieval-assets"), "worker"], tool_env(isolated.tmp))
    assert unset.returncode == 2 and "CELERY_BROKER_URL is not set" in unset.stderr
