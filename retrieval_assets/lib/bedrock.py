"""The Bedrock resource: Titan Text Embeddings v2 through the real boto3 `bedrock-runtime` client.

One text per InvokeModel call (Titan's API), many calls at once (`max_concurrency` threads; the
Dagster pool `bedrock` caps steps across runs). Throttling (429), timeouts (408 and client-side),
model errors (424) and server errors (5xx) are retried with exponential backoff and jitter;
client errors such as 400 are not. Inputs are kept within Titan's limits (50,000 characters,
8,192 tokens) and every truncation is counted.

Without AWS credentials (the embedded default) the resource starts the local Bedrock-compatible
endpoint in-process and labels every vector as coming from it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import orjson
from dagster._config.field_utils import IntEnvVar
from pydantic import Field, PrivateAttr, field_validator

from retrieval_assets.lib.bedrock_emulator import (
    MAX_INPUT_CHARS,
    MAX_INPUT_TOKENS,
    Faults,
    LocalBedrock,
    TitanVectors,
)
from retrieval_assets.lib.models import DEFAULT_ST_MODEL
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR
from retrieval_assets.lib.schema import (
    DEFAULT_TITAN_DIMENSIONS,
    TITAN_MODEL_ID,
    validate_titan_dimensions,
)

RETRYABLE_STATUS = frozenset({408, 424, 429, 500, 502, 503, 504})
LOCAL_LABEL_PREFIX = "local-bedrock-endpoint:"


class BedrockError(RuntimeError):
    def __init__(self, message: str, status: int | None, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class Embedding:
    """One text's outcome: a vector, or the error that remained after retries."""

    vector: np.ndarray | None
    error: str | None
    attempts: int
    truncated: bool


class LocalFaults(dg.Config):
    """What the local Bedrock endpoint does wrong on purpose, as Bedrock can: slow answers,
    throttling, server errors, timeouts. Tests and the fault suite set them; nothing else does."""

    latency_ms: float = Field(
        default=0.0, description="Milliseconds to answer each call, its own work included."
    )
    throttle_rate: float = Field(default=0.0, description="Share of calls answered 429.")
    error_rate: float = Field(default=0.0, description="Share of calls answered 5xx.")
    timeout_rate: float = Field(default=0.0, description="Share of calls left unanswered.")
    seed: int | None = Field(default=None, description="Seed of the draws (reproducible runs).")


class BedrockResource(dg.ConfigurableResource):
    """Amazon Bedrock Titan Text Embeddings v2, or the local endpoint that stands in for it."""

    # The boto3 session's settings, as dagster-aws's ResourceWithBoto3Configuration names them.
    # Not inherited from it: installed, dagster-aws registers Dagster components that every
    # definitions load imports, its package's __init__ Dagster's test utilities with them (a
    # cost of every command, code server and worker start; figures in the README).
    region_name: str | None = Field(default=None, description="AWS region of Bedrock.")
    profile_name: str | None = Field(default=None, description="AWS profile of the session.")
    use_ssl: bool = Field(default=True, description="Use SSL.")
    endpoint_url: str | None = Field(
        default=None, description="A Bedrock runtime endpoint other than AWS's."
    )
    verify: bool | None = Field(default=True, description="Verify SSL certificates.")
    aws_access_key_id: str | None = Field(default=None, description="AWS access key id.")
    aws_secret_access_key: str | None = Field(default=None, description="AWS secret access key.")
    aws_session_token: str | None = Field(default=None, description="AWS session token.")
    model_id: str = Field(default=TITAN_MODEL_ID, description="Bedrock model id.")
    dimensions: int = Field(
        default=DEFAULT_TITAN_DIMENSIONS,
        description="Output size: 256, 512 or 1024 (Titan v2 accepts nothing else). Must equal "
        "the Postgres column (`retrieval-assets titan-dims N` migrates it).",
    )
    normalize: bool = Field(default=True, description="Ask Titan for unit-length vectors.")
    max_concurrency: int = Field(default=8, description="InvokeModel calls in flight per step.")
    max_attempts: int = Field(default=6, description="Attempts per text, the first included.")
    connect_timeout: float = Field(default=5.0, description="Seconds to connect.")
    read_timeout: float = Field(default=30.0, description="Seconds to wait for an answer.")
    use_local_endpoint: bool = Field(
        default=False,
        description="Serve the Bedrock runtime API locally (no AWS account needed); vectors are "
        "derived from local_model and labelled as such. The default when no AWS credentials "
        "are configured.",
    )
    local_model: str = Field(
        default=DEFAULT_ST_MODEL,
        description="Model behind the local endpoint's vectors (run as an ONNX export).",
    )
    data_dir: str = Field(default=str(DEFAULT_DATA_DIR), description="Model exports live here.")
    local_faults: LocalFaults = Field(
        default=LocalFaults(),
        description="Local endpoint only: faults it injects (the fault suite's); none by default.",
    )

    _client: Any = PrivateAttr(default=None)
    _endpoint: LocalBedrock | None = PrivateAttr(default=None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)
    _query_cache: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    @field_validator("dimensions", mode="before")
    @classmethod
    def _titan_dimensions(cls, value: object) -> object:
        # An EnvVar is checked when Dagster resolves it (this runs again on the value then);
        # int() on it here would raise "Attempted to directly retrieve environment variable".
        if isinstance(value, dg.EnvVar | IntEnvVar):
            return value
        return validate_titan_dimensions(value)  # type: ignore[arg-type]  # checked inside

    @property
    def label(self) -> str:
        """What produced the vectors: recorded per row and for the column; never mixed."""
        if self.use_local_endpoint:
            return f"{LOCAL_LABEL_PREFIX}{self.model_id} (from fastembed:{self.local_model})"
        return self.model_id

    @property
    def is_local(self) -> bool:
        return self.use_local_endpoint

    def endpoint_counts(self) -> dict[str, int]:
        """What the local endpoint answered (requests, ok, throttled, errors, timeouts)."""
        return dict(self._endpoint.counts) if self._endpoint is not None else {}

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._endpoint is not None:
            self._endpoint.stop()
            self._endpoint = None
            self._client = None

    @contextmanager
    def get_client(self) -> Iterator[Any]:
        yield self.client()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        endpoint_url, credentials = (
            self.endpoint_url,
            {
                "aws_access_key_id": self.aws_access_key_id,
                "aws_secret_access_key": self.aws_secret_access_key,
                "aws_session_token": self.aws_session_token,
            },
        )
        if self.use_local_endpoint:
            self._endpoint = self._start_local_endpoint()
            endpoint_url = self._endpoint.url
            credentials = {
                "aws_access_key_id": "local",
                "aws_secret_access_key": "local",
                "aws_session_token": None,
            }
        session = boto3.session.Session(profile_name=self.profile_name, **credentials)
        return session.client(
            "bedrock-runtime",
            region_name=self.region_name or "us-east-1",
            endpoint_url=endpoint_url,
            use_ssl=self.use_ssl,
            verify=self.verify,
            config=Config(
                # One retry policy, ours (see _invoke): botocore's would retry under it too.
                retries={"total_max_attempts": 1, "mode": "standard"},
                max_pool_connections=self.max_concurrency,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
            ),
        )

    def _start_local_endpoint(self) -> LocalBedrock:
        from retrieval_assets.lib.embedders import FastEmbedResource
        from retrieval_assets.lib.models import load_tokenizer

        model = FastEmbedResource(model=self.local_model, data_dir=self.data_dir)
        tokenizer = load_tokenizer(self.local_model)
        vectors = TitanVectors(
            model.embed_documents,
            lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids),
        )
        faults = Faults(
            latency_ms=self.local_faults.latency_ms,
            throttle_rate=self.local_faults.throttle_rate,
            error_rate=self.local_faults.error_rate,
            timeout_rate=self.local_faults.timeout_rate,
            timeout_seconds=self.read_timeout + 1,
            seed=self.local_faults.seed,
        )
        return LocalBedrock(vectors, faults).start()

    # ------------------------------------------------------------------------------- embedding

    def prepare(self, text: str, count_tokens=None) -> tuple[str, bool]:
        """`text` within Titan's limits, and whether it had to be cut.

        Tokens are counted with `count_tokens` (default: the packaged WordPiece tokenizer);
        Titan's own tokenizer differs, so texts are kept 10% under its 8,192-token limit.
        """
        truncated = False
        if len(text) > MAX_INPUT_CHARS:
            text, truncated = text[:MAX_INPUT_CHARS], True
        count = count_tokens or self._default_token_count
        budget = int(MAX_INPUT_TOKENS * 0.9)
        if len(text) > budget:  # short texts cannot exceed the budget: skip counting
            while (tokens := count(text)) > budget:
                text, truncated = text[: int(len(text) * budget / tokens * 0.98)], True
        return text, truncated

    def _default_token_count(self, text: str) -> int:
        from retrieval_assets.lib.models import load_tokenizer

        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.local_model)
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _invoke(self, text: str) -> np.ndarray:
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

        body = orjson.dumps(
            {"inputText": text, "dimensions": self.dimensions, "normalize": self.normalize}
        )
        try:
            response = self.client().invoke_model(
                modelId=self.model_id,
                body=body,
                contentType="application/json",
                accept="application/json",
            )
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code", "")
            raise BedrockError(
                f"{code} ({status}): {exc}", status, status in RETRYABLE_STATUS
            ) from exc
        except (HTTPClientError, ConnectionError) as exc:  # timeouts, resets, refused
            raise BedrockError(f"{type(exc).__name__}: {exc}", None, True) from exc
        vector = np.asarray(orjson.loads(response["body"].read())["embedding"], dtype=np.float32)
        if vector.shape != (self.dimensions,):
            raise BedrockError(
                f"expected {self.dimensions} dimensions, got {vector.shape}", None, False
            )
        return vector

    def embed(self, text: str, count_tokens=None) -> Embedding:
        """One text, retried on throttling, timeouts and server errors; never raises."""
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            wait_exponential_jitter,
        )

        prepared, truncated = self.prepare(text, count_tokens)
        attempts = 0
        try:
            for attempt in Retrying(
                retry=retry_if_exception(lambda e: isinstance(e, BedrockError) and e.retryable),
                stop=stop_after_attempt(self.max_attempts),
                wait=wait_exponential_jitter(multiplier=0.1, max=10.0),
            ):
                with attempt:
                    attempts += 1
                    vector = self._invoke(prepared)
            return Embedding(vector, None, attempts, truncated)
        except RetryError as exc:  # retryable, but out of attempts
            return Embedding(None, str(exc.last_attempt.exception()), attempts, truncated)
        except BedrockError as exc:  # not retryable (e.g. 400)
            return Embedding(None, str(exc), attempts, truncated)
        except Exception as exc:  # anything else is this row's failure, not the batch's
            return Embedding(None, f"{type(exc).__name__}: {exc}", attempts, truncated)

    def embed_query(self, text: str) -> np.ndarray:
        """A query's vector, through an LRU cache; raises if Titan cannot embed it."""
        from retrieval_assets.lib.embedders import QueryCache

        with self._lock:
            if self._query_cache is None:
                self._query_cache = QueryCache(self._query_vector)
        return self._query_cache.get(text)

    def _query_vector(self, text: str) -> np.ndarray:
        result = self.embed(text)
        if result.vector is None:
            raise BedrockError(f"could not embed the query: {result.error}", None, False)
        return result.vector

    def embed_many(self, texts: Sequence[str], count_tokens=None) -> list[Embedding]:
        """Embed `texts` with up to `max_concurrency` calls in flight; results in input order."""
        if not texts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(texts))) as pool:
            return list(pool.map(lambda t: self.embed(t, count_tokens), texts))
