"""A local Bedrock runtime endpoint for Titan Text Embeddings v2 (Bedrock is unreachable here).

It serves `POST /model/{modelId}/invoke` with Titan's request and response JSON, so the real
boto3 client reaches it through `endpoint_url` (SigV4-signed requests are accepted; the signature
is not checked). It enforces Titan's rules (dimensions 256/512/1024, ≤ 50,000 characters, ≤ 8,192
tokens) and answers with vectors derived from a local embedding model, mapped to the requested
size by a fixed orthonormal matrix — for 512 and 1024 dimensions that map preserves cosine
similarity exactly, so search over the vectors means something.

For tests and benchmarks it answers after a configured latency (its own work included) and
injects throttling (429), server errors (500/503) and timeouts at configured rates.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import numpy as np
import orjson

from retrieval_assets.lib.schema import TITAN_DIMENSIONS, TITAN_MODEL_ID

MAX_INPUT_CHARS = 50_000
MAX_INPUT_TOKENS = 8_192
_PROJECTION_SEED = 20_240_430


@dataclass(frozen=True)
class Faults:
    """Fault injection for the local endpoint; all rates are per request, in [0, 1]."""

    # The time the endpoint takes to answer, its own work included (as a Bedrock model's latency).
    latency_ms: float = 0.0
    throttle_rate: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    timeout_seconds: float = 5.0
    seed: int | None = None


def projection(source_dims: int, dims: int) -> np.ndarray:
    """A fixed (source_dims x dims) matrix with orthonormal rows (dims ≥ source) or columns."""
    size = max(source_dims, dims)
    gaussian = np.random.default_rng(_PROJECTION_SEED).standard_normal((size, size))
    q, _ = np.linalg.qr(gaussian)
    return q[:source_dims, :dims].astype(np.float32)


class TitanVectors:
    """Titan-shaped vectors from a local model: `embed(texts) -> (n, d)` unit vectors."""

    def __init__(
        self,
        embed: Callable[[list[str]], np.ndarray] | None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> None:
        self._embed = embed
        self._count_tokens = count_tokens or (lambda text: max(1, len(text) // 4))
        self._projections: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def tokens(self, text: str) -> int:
        return self._count_tokens(text)

    def vector(self, text: str, dims: int, normalize: bool) -> np.ndarray:
        if self._embed is None:  # hash mode: cheap, deterministic, no meaning (throughput tests)
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
        else:
            base = self._embed([text])[0]
            vector = base @ self._projection(base.shape[0], dims)
        if normalize:
            vector = vector / np.linalg.norm(vector)
        else:  # Titan's unnormalised vectors are not unit length either
            vector = vector * 3.0
        return vector

    def _projection(self, source: int, dims: int) -> np.ndarray:
        with self._lock:
            if (source, dims) not in self._projections:
                self._projections[(source, dims)] = projection(source, dims)
            return self._projections[(source, dims)]


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that timed out and hung up is expected under injected timeouts."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LocalBedrock:
    """The endpoint: start() on a free loopback port, `url` for boto3's endpoint_url, stop()."""

    def __init__(
        self,
        vectors: TitanVectors,
        faults: Faults = Faults(),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.vectors = vectors
        self.faults = faults
        self._random = random.Random(faults.seed)
        self._random_lock = threading.Lock()
        self.counts = {
            "requests": 0,
            "ok": 0,
            "throttled": 0,
            "errors": 0,
            "timeouts": 0,
            "rejected": 0,
        }
        self._server = _QuietServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> LocalBedrock:
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="local-bedrock"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalBedrock:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _draw(self) -> float:
        with self._random_lock:
            return self._random.random()

    def _count(self, key: str) -> None:
        with self._random_lock:
            self.counts[key] += 1

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; with Nagle's algorithm the body waits for
            # the client's delayed ACK (~40 ms a call).
            disable_nagle_algorithm = True
            answer_at = 0.0  # perf_counter() before which no answer leaves (Faults.latency_ms)

            def log_message(self, *args) -> None:  # quiet: the client logs what matters
                return

            def _send(
                self,
                status: int,
                body: dict,
                error_type: str | None = None,
                headers: dict[str, str] | None = None,
            ) -> None:
                payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("x-amzn-RequestId", hashlib.md5(payload).hexdigest())
                if error_type:
                    self.send_header("x-amzn-ErrorType", f"{error_type}:http://internal/")
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                if (wait := self.answer_at - time.perf_counter()) > 0:
                    time.sleep(wait)
                self.end_headers()
                self.wfile.write(payload)

            def _reject(self, status: int, error_type: str, message: str) -> None:
                endpoint._count("rejected")
                self._send(status, {"message": message}, error_type)

            def do_POST(self) -> None:
                endpoint._count("requests")
                arrived = time.perf_counter()
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.split("/")
                if len(parts) != 4 or parts[1] != "model" or parts[3] != "invoke":
                    return self._reject(404, "UnknownOperationException", "unknown operation")
                if not (self.headers.get("Authorization") or "").startswith("AWS4-HMAC-SHA256"):
                    return self._reject(403, "AccessDeniedException", "request is not signed")
                if unquote(parts[2]) != TITAN_MODEL_ID:
                    return self._reject(
                        400, "ValidationException", "The provided model identifier is invalid."
                    )
                faults = endpoint.faults
                self.answer_at = arrived + faults.latency_ms / 1000
                draw = endpoint._draw()
                if draw < faults.throttle_rate:
                    endpoint._count("throttled")
                    return self._send(
                        429,
                        {"message": "Too many requests, please wait before trying again."},
                        "ThrottlingException",
                    )
                draw -= faults.throttle_rate
                if draw < faults.error_rate:
                    endpoint._count("errors")
                    kind = (
                        ("ServiceUnavailableException", 503)
                        if draw < faults.error_rate / 2
                        else ("InternalServerException", 500)
                    )
                    return self._send(kind[1], {"message": "injected failure"}, kind[0])
                draw -= faults.error_rate
                if draw < faults.timeout_rate:
                    endpoint._count("timeouts")
                    time.sleep(faults.timeout_seconds)
                    return self._send(
                        408, {"message": "Model has timed out"}, "ModelTimeoutException"
                    )
                try:
                    request = orjson.loads(body)
                    text = request["inputText"]
                    dims = request.get("dimensions", 1024)
                    normalize = request.get("normalize", True)
                except (ValueError, KeyError, TypeError):
                    return self._reject(
                        400,
                        "ValidationException",
                        "Malformed input request: #: required key [inputText] not found",
                    )
                if not isinstance(text, str) or not text:
                    return self._reject(
                        400,
                        "ValidationException",
                        "Malformed input request: inputText must be non-empty",
                    )
                if dims not in TITAN_DIMENSIONS:
                    return self._reject(
                        400,
                        "ValidationException",
                        f"Malformed input request: #/dimensions: {dims} is not a valid enum value",
                    )
                if len(text) > MAX_INPUT_CHARS:
                    return self._reject(
                        400,
                        "ValidationException",
                        "Malformed input request: "
                        f"#/inputText: expected maxLength: {MAX_INPUT_CHARS}, "
                        f"actual: {len(text)}",
                    )
                tokens = endpoint.vectors.tokens(text)
                if tokens > MAX_INPUT_TOKENS:
                    return self._reject(
                        400,
                        "ValidationException",
                        "Too many input tokens. "
                        f"Max input tokens: {MAX_INPUT_TOKENS}, request input "
                        f"token count: {tokens}",
                    )
                try:
                    vector = np.ascontiguousarray(
                        endpoint.vectors.vector(text, dims, normalize), dtype=np.float32
                    )
                except Exception as exc:  # the model failed: answer like Bedrock, not hang up
                    endpoint._count("errors")
                    return self._send(
                        500, {"message": f"model error: {exc}"}, "InternalServerException"
                    )
                endpoint._count("ok")
                self._send(
                    200,
                    {
                        "embedding": vector,
                        "embeddingsByType": {"float": vector},
                        "inputTextTokenCount": tokens,
                    },
                    headers={"X-Amzn-Bedrock-Input-Token-Count": str(tokens)},
                )
                return None

        return Handler


def main(argv: list[str] | None = None) -> None:
    """Serve the endpoint in its own process: `python -m retrieval_assets.lib.bedrock_emulator`."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Local Bedrock runtime endpoint (Titan v2)")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--throttle-rate", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument(
        "--hash-vectors",
        action="store_true",
        help="deterministic vectors without a model (throughput tests only)",
    )
    args = parser.parse_args(argv)
    embed = None
    if not args.hash_vectors:
        from retrieval_assets.lib.embedders import FastEmbedResource
        from retrieval_assets.lib.models import DEFAULT_ST_MODEL
        from retrieval_assets.lib.settings import data_dir

        # Its model export under RETRIEVAL_DATA_DIR, as every other process of the project.
        embed = FastEmbedResource(model=DEFAULT_ST_MODEL, data_dir=str(data_dir())).embed_documents
    endpoint = LocalBedrock(
        TitanVectors(embed),
        Faults(
            latency_ms=args.latency_ms, throttle_rate=args.throttle_rate, error_rate=args.error_rate
        ),
        port=args.port,
    ).start()
    print(f"local Bedrock endpoint on {endpoint.url}", flush=True)  # noqa: T201
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    endpoint.stop()


if __name__ == "__main__":
    main()
