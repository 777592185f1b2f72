"""Real text for the benchmarks, and its embeddings cached across runs.

Sentences come from the AWS API documentation that botocore ships (about 280,000 unique English
sentences): real prose, not generated filler, and on every machine that installs the project.
Embedding 250,000 of them takes minutes, so vectors are cached under .data/bench keyed by model.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retrieval_assets.lib.paths import DEFAULT_DATA_DIR

CACHE_DIR = DEFAULT_DATA_DIR / "bench"
_TAG = re.compile(r"<[^>]+>")


def _documentation(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "documentation" and isinstance(value, str):
                yield value
            else:
                yield from _documentation(value)
    elif isinstance(node, list):
        for value in node:
            yield from _documentation(value)


def sentences(limit: int, seed: int = 7) -> list[str]:
    """`limit` unique sentences (40-400 characters), in a fixed shuffled order."""
    import botocore

    seen: set[str] = set()
    out: list[str] = []
    for path in sorted((Path(botocore.__file__).parent / "data").glob("*/*/service-2.json*")):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        for doc in _documentation(json.loads(raw)):
            text = " ".join(html.unescape(_TAG.sub(" ", doc)).split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if 40 <= len(sentence) <= 400 and sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    if len(out) < limit:
        raise RuntimeError(f"only {len(out)} sentences available, {limit} asked for")
    order = np.random.default_rng(seed).permutation(len(out))[:limit]
    return [out[i] for i in order]


def chat_texts(pieces: list[str], count: int, seed: int = 11) -> list[str]:
    """Chunk-like texts of real length: 1-8 sentences as a user/assistant exchange."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        picked = [pieces[i] for i in rng.integers(0, len(pieces), size=rng.integers(2, 9))]
        texts.append(f"user: {picked[0]}\nassistant: {' '.join(picked[1:])}")
    return texts


def cached_embeddings(
    name: str,
    texts: list[str],
    embed: Callable[[list[str]], np.ndarray],
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """`embed(texts)`, computed once and kept in .data/bench (keyed by name and the texts)."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    path = CACHE_DIR / f"{name}-{len(texts)}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    vectors = np.empty((0, 0), dtype=np.float32)
    parts = []
    step = 20_000
    for i in range(0, len(texts), step):
        parts.append(embed(texts[i : i + step]))
        log(
            f"  embedding {name}: {min(i + step, len(texts)):,}/{len(texts):,} "
            f"({(i + step) / (time.monotonic() - started):.0f} texts/s)"
        )
    vectors = np.concatenate(parts).astype(np.float32)
    np.save(path, vectors)
    return vectors


def percentiles(samples_ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples_ms, 50)), float(np.percentile(samples_ms, 99))


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """This machine's float32 matrix-multiply rate (GFLOP/s), best of `repeats`."""
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@contextmanager
def hash_vector_endpoint(latency_ms: float = 0.0) -> Iterator[str]:
    """A Bedrock-compatible endpoint in its own process (as Bedrock is) that derives vectors by
    hashing, so only the client and what follows it cost CPU here; yields its URL."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retrieval_assets.lib.bedrock_emulator",
            "--port",
            str(port),
            "--latency-ms",
            str(latency_ms),
            "--hash-vectors",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "local Bedrock endpoint" in server.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def network_distance(url: str, rtt_ms: float) -> Iterator[str]:
    """`url` (the embedded server's Unix socket) reached instead through a loopback TCP relay that
    holds every chunk rtt_ms / 2 in each direction: a database across a network, as Supabase is
    from the machine that writes to it. Yields the relayed URL."""
    import queue
    import socket
    import threading

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    target = f"{params['host']}/.s.PGSQL.{params.get('port', 5432)}"
    delay = rtt_ms / 2000
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def pump(src: socket.socket, dst: socket.socket) -> None:
        held: queue.Queue = queue.Queue()

        def release() -> None:
            while (item := held.get()) is not None:
                due, data = item
                time.sleep(max(0.0, due - time.perf_counter()))
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=release, daemon=True)
        sender.start()
        while data := src.recv(1 << 20):
            held.put((time.perf_counter() + delay, data))
        held.put(None)
        sender.join()

    def serve() -> None:
        while not stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = socket.socket(socket.AF_UNIX)
            server.connect(target)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield make_conninfo(url, host="127.0.0.1", port=listener.getsockname()[1])
    finally:
        stopping.set()
        listener.close()
