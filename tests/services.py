"""Real servers the scale-out tests start on loopback and always stop: an S3-compatible object
store (moto's server mode) and Redis (Debian's redis-server, the celery broker)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Read by the AWS_PROFILE check (botocore): pointed at files of the test's own.
AWS_FILES = ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
S3_KEYS = {"aws_access_key_id": "test-key", "aws_secret_access_key": "s3-planted-secret-4d5e6f"}


def clean_environ() -> dict[str, str]:
    """This process's environment without any project setting or AWS file of the machine's."""
    from retrieval_assets.lib.settings import BY_NAME

    return {k: v for k, v in os.environ.items() if k not in BY_NAME and k not in AWS_FILES}


def database_on(server_url: str, name: str) -> str:
    """A new, empty database `name` on the server of `server_url`; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    base, query = server_url.split("?", 1)
    return f"{base.rsplit('/', 1)[0]}/{name}?{query}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}): {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {seconds}s: {log.read_text()[-2000:]}")


@contextmanager
def _server(command: list[str], port: int, log: Path) -> Iterator[subprocess.Popen]:
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reaped either way."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> str:
        """LANCEDB_STORAGE_OPTIONS for this server (keys, endpoint, plain HTTP)."""
        return json.dumps(
            {
                **S3_KEYS,
                "aws_endpoint": self.endpoint,
                "allow_http": "true",
                "aws_region": "us-east-1",
            }
        )

    def uri(self, name: str) -> str:
        """A LanceDB URI of its own in the bucket."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEYS["aws_access_key_id"],
            aws_secret_access_key=S3_KEYS["aws_secret_access_key"],
        )


@contextmanager
def s3_server(root: Path) -> Iterator[ObjectStore]:
    """moto's S3 server on a free loopback port, with one bucket. Its conditional puts
    (If-None-Match) are what LanceDB commits with (tests/test_object_storage.py)."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    with _server([str(moto), "-H", "127.0.0.1", "-p", str(port)], port, root / "moto.log"):
        store = ObjectStore(f"http://127.0.0.1:{port}", "retrieval-tests")
        store.client().create_bucket(Bucket=store.bucket)
        yield store


@contextmanager
def redis_server(root: Path) -> Iterator[str]:
    """Debian's redis-server on a free loopback port, nothing persisted; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (./dev test installs Debian's)")
    port = free_port()
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(root),
    ]  # fmt: skip
    with _server(command, port, root / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"
