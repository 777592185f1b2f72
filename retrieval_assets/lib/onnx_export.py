"""Exporting a sentence-transformers model (offline, from its local files) to ONNX, so FastEmbed
can run it: once per machine, into the model cache, in a child process (PyTorch stays out of the
step process that asked for it).

An export is a pure function of the model and the exporter, so every data directory (the embedded
default, production, a benchmark's, a test's) shares one: its folder is named by the model and a
fingerprint of those inputs (a packaged model by its package's version, any other by its files),
so a changed model or another torch never reuses an old export.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
from pathlib import Path

from retrieval_assets.lib.models import PACKAGED_MODELS, local_model_dir, packaged_model_dir
from retrieval_assets.lib.paths import MODEL_CACHE_DIR

# Bump when _export_onnx_here changes what it writes: every export is made anew.
EXPORT_FORMAT = 1
EXPORTS_DIR = MODEL_CACHE_DIR / "onnx"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "config.json",
    "vocab.txt",
)


def export_folder(model: str) -> str:
    """The export's folder name: the model's slug and a fingerprint of what the export is made
    from (torch's and transformers' versions; EXPORT_FORMAT; the model: a model shipped in a
    package by the package's name and version, so a reinstall, a new virtualenv or a fresh clone
    reuses the export; any other by its files' names, sizes and modification times)."""
    source = local_model_dir(model)
    digest = hashlib.sha256(f"{EXPORT_FORMAT}".encode())
    for dist in ("torch", "transformers"):
        digest.update(f"\0{dist}={importlib.metadata.version(dist)}".encode())
    package = PACKAGED_MODELS.get(model)
    if package is not None and source == packaged_model_dir(package):
        digest.update(f"\0{package}={importlib.metadata.version(package)}".encode())
    else:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(
                f"\0{path.relative_to(source)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
            )
    return f"{slug(model)}-{digest.hexdigest()[:12]}"


def query_check_file(model: str, exports_dir: Path = EXPORTS_DIR) -> Path:
    """Where the verdict on `model`'s export for queries (does it compute PyTorch's vectors?) is
    kept, beside the export: found once, it holds as long as the export's inputs do."""
    return exports_dir / f"{export_folder(model)}.queries.json"


def export_onnx(model: str, exports_dir: Path = EXPORTS_DIR) -> Path:
    """Export `model` (offline) to ONNX for FastEmbed, once; later calls reuse the export.

    The export runs in a child process: it imports PyTorch and transformers and leaves about
    0.5 GB of heap behind, which would otherwise stay in the calling (step) process for the rest
    of its work.
    """
    import subprocess
    import sys

    from filelock import FileLock

    # A missing model fails here, with the error that says what to do.
    target = exports_dir / export_folder(model)
    if (target / "model.onnx").is_file():
        return target
    exports_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent step processes export only once
        if (target / "model.onnx").is_file():
            return target
        child = subprocess.run(
            [sys.executable, "-m", "retrieval_assets.lib.onnx_export", model, str(target)],
            capture_output=True,
            text=True,
        )
        if child.returncode != 0 or not (target / "model.onnx").is_file():
            raise RuntimeError(
                f"exporting {model} to ONNX in {exports_dir} failed (exit {child.returncode}): "
                f"{child.stderr.strip()[-2000:]}"
            )
    return target


def _export_onnx_here(model: str, target: Path) -> None:
    """The export itself into `target` (export_onnx runs it in a child process, holding the
    export lock)."""
    import torch
    from transformers import AutoModel

    source = local_model_dir(model)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    hf_model = AutoModel.from_pretrained(str(source), local_files_only=True).eval()

    class KeywordCall(torch.nn.Module):
        """Calls the model with keyword arguments: transformers 5 breaks positional calls."""

        def __init__(self) -> None:
            super().__init__()
            self.model = hf_model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state

    ids = torch.ones(2, 8, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    inputs = ("input_ids", "attention_mask", "token_type_ids")
    torch.onnx.export(
        KeywordCall(),
        (ids, torch.ones_like(ids), torch.zeros_like(ids)),
        str(partial / "model.onnx"),
        input_names=list(inputs),
        output_names=["last_hidden_state"],
        dynamic_axes={name: axes for name in (*inputs, "last_hidden_state")},
        opset_version=17,
        dynamo=False,
    )
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, partial / name)
    partial.rename(target)  # appears complete or not at all


def slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in model.strip("/"))


if __name__ == "__main__":  # export_onnx's child process: MODEL TARGET
    import sys

    _export_onnx_here(sys.argv[1], Path(sys.argv[2]))
