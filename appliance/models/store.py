"""Where a model's files are: a local folder, or a catalog id in the huggingface_hub cache layout."""
from __future__ import annotations

import os
from pathlib import Path

from appliance.models.gguf_model import find_gguf, gguf_files


def models_dir(configured: str = "") -> Path:
    """The model cache: EXO_MODELS_DIR / config, else huggingface_hub's own cache."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")).expanduser() / "hub"


def cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The newest snapshot of `repo_id` in a huggingface_hub cache, if one is there."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.exists():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime) if repo.is_dir() else []
    return snapshots[-1] if snapshots else None


def parse_gguf_spec(model: str) -> tuple[str, str] | None:
    """"ORG/REPO:FILE.gguf" (a GGUF file of a hub repo) -> (repo, file); None for anything else."""
    repo, sep, file = model.partition(":")
    return (repo, file) if sep and file.endswith(".gguf") and "/" in repo else None


def gguf_cache_path(repo: str, file: str, cache: Path | None = None) -> Path:
    """Where a GGUF file from the hub is kept: a sparse file, holding the parts this machine fetched."""
    return (cache or models_dir()) / "gguf" / ("models--" + repo.replace("/", "--")) / file


def resolve_model_dir(model: str, configured_models_dir: str = "") -> Path:
    """A model given as a folder, or as a hub id already in the cache; else a clear error."""
    if not model:
        raise FileNotFoundError("no model chosen: pass --model FOLDER_OR_ID or set `model` in the config")
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":   # a GGUF model: the file (the first of its splits)
        gguf_files(path)
        return path.resolve()
    if path.is_dir() and not (path / "config.json").exists() and find_gguf(path):
        return find_gguf(path).resolve()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.resolve()
    cache = models_dir(configured_models_dir)
    if parse_gguf_spec(model) and gguf_cache_path(*parse_gguf_spec(model), cache).exists():
        return gguf_cache_path(*parse_gguf_spec(model), cache)
    snapshot = cached_snapshot(model, cache)
    if snapshot is None:
        raise FileNotFoundError(
            f"model {model!r} is not on disk: expected a folder, or the hub id's files under "
            f"{cache / ('models--' + model.replace('/', '--'))} (set EXO_MODELS_DIR to use another cache)")
    return snapshot
