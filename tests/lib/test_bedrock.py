"""The Bedrock resource, through the real boto3 client, against the local endpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from retrieval_assets.lib.bedrock import BedrockResource, LocalFaults
from retrieval_assets.lib.bedrock_emulator import Faults, LocalBedrock, TitanVectors, projection


@pytest.mark.parametrize("bad", [768, 0, 1536, "abc", None])
def test_dimensions_other_than_256_512_1024_fail_when_the_resource_loads(bad):
    with pytest.raises(ValidationError, match="must be one of 256, 512, 1024"):
        BedrockResource(dimensions=bad)


@pytest.mark.parametrize("dims", [256, 512, 1024])
def test_each_titan_size_round_trips(make_bedrock, dims):
    result = make_bedrock(dimensions=dims).embed("a sentence about sourdough")
    assert result.error is None and result.vector.shape == (dims,)
    assert np.linalg.norm(result.vector) == pytest.approx(1.0, abs=1e-5)
    assert result.attempts == 1


def test_the_endpoint_rejects_what_titan_rejects_and_400s_are_not_retried(make_bedrock):
    bedrock = make_bedrock()
    client = bedrock.client()
    with pytest.raises(client.exceptions.ValidationException, match="dimensions"):
        client.invoke_model(
            modelId="amazon.titan-embed-text-v2:0",
            body=json.dumps({"inputText": "x", "dimensions": 768}),
        )
    with pytest.raises(client.exceptions.ValidationException, match="model identifier"):
        client.invoke_model(
            modelId="amazon.titan-embed-text-v1", body=json.dumps({"inputText": "x"})
        )
    wrong_model = make_bedrock(model_id="amazon.titan-embed-image-v1").embed("hello")
    assert wrong_model.vector is None and wrong_model.attempts == 1
    assert "ValidationException (400)" in wrong_model.error


def test_long_input_is_truncated_to_titan_limits_and_counted(make_bedrock):
    bedrock = make_bedrock()
    too_many_chars = bedrock.embed("w" * 60_000)
    assert too_many_chars.truncated and too_many_chars.vector is not None
    words = lambda text: len(text.split())  # noqa: E731 - a token count for the test
    too_many_tokens = bedrock.embed("token " * 9_000, count_tokens=words)
    assert too_many_tokens.truncated and too_many_tokens.vector is not None
    assert not bedrock.embed("short").truncated


def test_throttling_server_errors_and_timeouts_are_retried_and_nothing_is_lost(make_bedrock):
    bedrock = make_bedrock(
        # Seeded: the first 60 draws (one per request) hold 12 throttles, 5 errors and 4
        # timeouts, so every kind occurs; unseeded, no timeout at all came up about 1 run in 200.
        local_faults=LocalFaults(throttle_rate=0.3, error_rate=0.1, timeout_rate=0.05, seed=0),
        read_timeout=2.0,
        max_attempts=10,
        max_concurrency=8,
    )
    texts = [f"message number {i} about the weather" for i in range(60)]
    results = bedrock.embed_many(texts)
    assert all(r.vector is not None for r in results)
    counts = bedrock._endpoint.counts
    assert counts["throttled"] > 0 and counts["errors"] > 0 and counts["timeouts"] > 0
    assert sum(r.attempts for r in results) == counts["requests"]
    assert counts["ok"] >= len(texts)  # a slow answer may be retried; none is lost
    clean = make_bedrock().embed_many(texts[:5])
    assert all(np.allclose(a.vector, b.vector, atol=1e-5) for a, b in zip(results, clean))


def test_a_persistent_failure_is_reported_not_raised(make_bedrock):
    result = make_bedrock(local_faults=LocalFaults(error_rate=1.0), max_attempts=3).embed("doomed")
    assert result.vector is None and result.attempts == 3
    assert "503" in result.error or "500" in result.error


def test_local_vectors_keep_the_meaning_of_the_local_model(make_bedrock, fastembed):
    bedrock = make_bedrock(dimensions=1024)
    texts = [
        "my sourdough starter smells like acetone",
        "feeding a bread starter twice a day",
        "a composite index on customer_id and created_at",
    ]
    titan = np.stack([bedrock.embed(t).vector for t in texts])
    local = fastembed.embed_documents(texts)
    assert np.allclose(titan @ titan.T, local @ local.T, atol=1e-4)  # cosine preserved exactly
    assert "local-bedrock-endpoint" in bedrock.label and bedrock.is_local


def test_projection_is_orthonormal():
    up, down = projection(384, 1024), projection(384, 256)
    assert np.allclose(up @ up.T, np.eye(384), atol=1e-5)
    assert np.allclose(down.T @ down, np.eye(256), atol=1e-5)


def test_unsigned_requests_are_refused():
    import urllib.error
    import urllib.request

    with LocalBedrock(TitanVectors(None)) as endpoint:
        request = urllib.request.Request(
            f"{endpoint.url}/model/amazon.titan-embed-text-v2:0/invoke",
            data=b'{"inputText": "x"}',
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=5)
        assert error.value.code == 403


def test_the_endpoint_answers_after_its_latency_with_its_own_work_inside_it():
    """`latency_ms` is the time to answer (as a Bedrock model's latency), not a sleep on top of
    the endpoint's own work: calls take at least that long, and not much longer."""
    import time
    import urllib.request

    def embed(texts):  # a model that takes 30 ms of the endpoint's 80
        time.sleep(0.03)
        return np.ones((len(texts), 384), dtype=np.float32)

    with LocalBedrock(TitanVectors(embed), Faults(latency_ms=80)) as endpoint:
        request = urllib.request.Request(
            f"{endpoint.url}/model/amazon.titan-embed-text-v2:0/invoke",
            data=b'{"inputText": "x", "dimensions": 256}',
            headers={"Authorization": "AWS4-HMAC-SHA256 test"},
            method="POST",
        )
        took = []
        for _ in range(3):
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=5) as response:
                assert len(json.loads(response.read())["embedding"]) == 256
            took.append(time.perf_counter() - started)
    assert min(took) >= 0.080
    assert min(took) < 0.080 + 0.025  # a sleep added after the 30 ms of work would give 110 ms
