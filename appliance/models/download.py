"""Downloads from the Hugging Face Hub (or a mirror), into huggingface_hub's cache layout.

A node fetches only what its shard needs: config.json, the safetensors index, and the
safetensors files that hold its own layers (plus the embedding / norm / head when it is the
first or last stage). The coordinator fetches config.json and the tokenizer files.

Everything goes through `huggingface_hub.hf_hub_download`, so it honours HF_ENDPOINT, HF_TOKEN
and HF_HUB_OFFLINE, resumes a transfer whose connection drops, and draws its tqdm progress bar
on a terminal. `Progress` adds up the bytes of all files of one job and reports bytes, total,
speed and ETA to a callback (the node publishes it on MQTT).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import (_CACHED_NO_EXIST, get_hf_file_metadata, hf_hub_download, hf_hub_url,
                             try_to_load_from_cache)
from huggingface_hub.errors import (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RemoteEntryNotFoundError)
from huggingface_hub.utils import tqdm as hf_tqdm
from huggingface_hub.utils import build_hf_headers, validate_repo_id

from appliance.models.config import ModelConfig
from appliance.models.store import gguf_cache_path, models_dir, parse_gguf_spec
from appliance.models.weights import INDEX, shard_tensor_names

CONFIG_FILES = ["config.json", "generation_config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
OPTIONAL = {"generation_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer_config.json"}
SINGLE_FILE = "model.safetensors"
REPORT_EVERY_S = 0.5


class DownloadError(FileNotFoundError):
    """A model's files could not be had: offline with nothing cached, not found, refused."""


class HubUnreachable(DownloadError):
    """The hub did not answer at all (no network, no DNS, refused, timed out): the API says 504."""


class HubFailed(DownloadError):
    """The hub answered with a server error: the API says 502."""


# huggingface_hub gives its logger a handler of its own and lets records propagate as well: under
# the application's logging every warning of it was printed twice. The application's is enough.
logging.getLogger("huggingface_hub").handlers.clear()
log = logging.getLogger(__name__)

HUB_TRIES = 3            # tries of the reachability check, each said in the log, before giving up
HUB_TIMEOUT_S = 3.0      # each try's connect and answer
HUB_CHECK_S = 60.0       # a hub that answered is not asked again for this long


def check_hub(repo: str, tries: int = HUB_TRIES) -> None:
    """Ask the hub once (a HEAD for the repo's config.json) before huggingface_hub does: where it
    cannot be reached, its own retries would take 24 s per file. Any HTTP answer will do; the
    download that follows says what was wrong with it."""
    global _hub_answered
    if time.monotonic() - _hub_answered < HUB_CHECK_S:
        return
    url = hf_hub_url(repo, CONFIG_FILES[0], endpoint=_endpoint())
    for attempt in range(1, tries + 1):
        try:
            request = urllib.request.Request(url, method="HEAD", headers=build_hf_headers())   # HF_TOKEN too
            urllib.request.urlopen(request, timeout=HUB_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass   # an answer: the hub is there
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if attempt == tries:
                raise HubUnreachable(f"cannot reach the hub at {_hub_name()} ({reason}) after {tries} tries, and "
                                     f"{repo} is not in the model cache: check the network, or set HF_ENDPOINT "
                                     "to a mirror") from None
            log.warning("the hub at %s does not answer (%s): try %d of %d in %d s", _hub_name(), reason,
                        attempt + 1, tries, attempt)
            time.sleep(attempt)   # a back-off: nothing else tells us when the network is back
            continue
        _hub_answered = time.monotonic()
        return


_hub_answered = -HUB_CHECK_S


def _hub_name() -> str:
    return _endpoint() or "huggingface.co"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Progress:
    """Bytes of one download job, summed over its files; reported at most every REPORT_EVERY_S."""
    model: str
    report: Callable[[dict], None] = lambda state: None
    total: int = 0
    done: int = 0                   # bytes on disk for this job (cached files count at once)
    fetched: int = 0                # bytes that came over the network in this job
    started: float = field(default_factory=time.monotonic)
    last_report: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, n: int, network: bool = True) -> None:
        with self.lock:
            self.done += n
            self.fetched += n if network else 0
            now = time.monotonic()
            if now - self.last_report < REPORT_EVERY_S:
                return
            self.last_report = now
        self.send("downloading")

    def state(self, state: str, error: str | None = None) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        speed = self.fetched / elapsed
        left = max(self.total - self.done, 0)
        eta = left / speed if speed > 0 else None
        return {"model": self.model, "state": state, "bytes": self.done, "total": self.total,
                "speed": round(speed, 1), "eta": None if eta is None else round(eta, 1), "error": error}

    def send(self, state: str, error: str | None = None) -> None:
        self.report(self.state(state, error))

    def bar_class(self) -> type:
        """A huggingface_hub tqdm class (it still draws on a terminal) that also counts into us."""
        progress = self

        class Bar(hf_tqdm):
            def update(self, n=1):
                progress.add(int(n or 0))
                return super().update(n)
        return Bar


# -- which files
def shard_files(weight_map: dict[str, str], config: ModelConfig, start: int, end: int) -> list[str]:
    """The safetensors files that hold the tensors of layers [start, end)."""
    names = shard_tensor_names(weight_map, start, end, start == 0, end == config.num_layers,
                               config.tie_word_embeddings)
    return sorted({weight_map[n] for n in names})


# -- fetching
def fetch(repo: str, files: list[str], progress: Progress | None = None, revision: str = "main",
          cache: Path | None = None) -> Path:
    """Make sure `files` of `repo` are in the cache; return the snapshot folder. Files named in
    OPTIONAL may be missing from the repo."""
    cache = cache or models_dir()
    progress = progress or Progress(repo)
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise DownloadError(f"{repo!r} is neither a model folder nor a hub id like org/name") from e
    _size_up(repo, files, progress, revision, cache)
    folder = None
    for f in files:
        path = _fetch_one(repo, f, progress, revision, cache)
        if path is None and f not in OPTIONAL:
            raise DownloadError(f"{repo} has no file {f}")
        folder = path.parent if path else folder
    return folder


def _fetch_one(repo: str, f: str, progress: Progress, revision: str, cache: Path) -> Path | None:
    """The file's path in the cache, or None when the hub says the repo has no such file."""
    cached = try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is _CACHED_NO_EXIST:
        return None
    if not _offline():
        check_hub(repo)
    try:
        return Path(hf_hub_download(repo, f, revision=revision, cache_dir=cache, tqdm_class=progress.bar_class(),
                                    endpoint=_endpoint()))
    except RemoteEntryNotFoundError:
        return None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if _offline():
            where = cache / ("models--" + repo.replace("/", "--"))
            raise DownloadError(f"model {repo!r}: {f} is not on disk under {where} and HF_HUB_OFFLINE is set, "
                                f"so it cannot be downloaded; unset HF_HUB_OFFLINE or copy the model there") from e
        if (status := _server_error(e)) is not None:   # huggingface_hub reports a failed HEAD as "not cached"
            raise HubFailed(f"cannot download {f} of {repo}: the hub at {_hub_name()} answered {status}") from e
        raise HubUnreachable(f"cannot download {f} of {repo}: the hub at {_hub_name()} cannot be reached and "
                             f"the file is not cached ({_first_line(e)})") from e
    except HfHubHTTPError as e:
        if (status := _server_error(e)) is not None:
            raise HubFailed(f"cannot download {f} of {repo}: the hub at {_hub_name()} answered {status}") from e
        raise DownloadError(f"cannot download {f} of {repo}: {_first_line(e)}") from e
    except Exception as e:  # refused tokens, a repo that does not exist
        raise DownloadError(f"cannot download {f} of {repo}: {_first_line(e)}") from e


def _server_error(e: BaseException | None) -> int | None:
    """The 5xx status of the hub's answer behind `e` (or what caused it), if that is what it was."""
    while e is not None:
        response = getattr(e, "response", None) if isinstance(e, HfHubHTTPError) else None
        if response is not None and response.status_code >= 500:
            return response.status_code
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: Exception) -> str:
    """huggingface_hub's messages run to several lines of advice: the first says what happened."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _size_up(repo, files, progress: Progress, revision, cache) -> None:
    """Set the job's total: cached files count as done, missing ones are sized by a HEAD request."""
    for f in files:
        cached = try_to_load_from_cache(repo, f, cache_dir=cache, revision=revision)
        if isinstance(cached, str):
            size = os.path.getsize(cached)
            progress.total += size
            progress.add(size, network=False)
        elif cached is None and not _offline():
            check_hub(repo)
            try:
                url = hf_hub_url(repo, f, revision=revision, endpoint=_endpoint())
                progress.total += get_hf_file_metadata(url).size or 0
            except Exception:   # a missing optional file, or an error hf_hub_download will report
                pass


def fetch_for_coordinator(repo: str, revision: str = "main", cache: Path | None = None) -> Path:
    """config.json and the tokenizer: what the coordinator needs to build prompts and decode."""
    return fetch(repo, CONFIG_FILES + TOKENIZER_FILES, revision=revision, cache=cache)


def fetch_shard(repo: str, start: int | None = None, end: int | None = None, progress: Progress | None = None,
                revision: str = "main", cache: Path | None = None) -> Path:
    """config.json, then the index, then only the safetensors files that hold layers [start, end)
    (all layers when start/end are None)."""
    progress = progress or Progress(repo)
    folder = fetch(repo, CONFIG_FILES, revision=revision, cache=cache)
    config = ModelConfig.load(folder)
    start, end = start or 0, config.num_layers if end is None else end
    index = _fetch_one(repo, INDEX, Progress(repo), revision, cache or models_dir())
    if index is None:                  # an unsharded checkpoint has no index
        files = [SINGLE_FILE]
    else:
        files = shard_files(json.loads(index.read_text())["weight_map"], config, start, end)
    fetch(repo, files, progress, revision, cache)
    progress.send("done")
    return folder


# -- GGUF files: a node fetches the header and the byte ranges of its own layers' tensors
GGUF_HEADER_GUESS = 1 << 20        # the first read; doubled until the whole header is in


def fetch_gguf_shard(model: str, start: int | None = None, end: int | None = None, progress: Progress | None = None,
                     revision: str = "main", cache: Path | None = None) -> Path:
    """A GGUF file of the hub, as a sparse file of its full size in which this node holds the
    header and the tensors of layers [start, end) (with the embedding / head where the stage
    needs them); start = end = 0: the header only (the coordinator's config and tokenizer). Every
    range resumes where a dropped transfer stopped, also after a restart (FILE.ranges.json)."""
    repo, file = parse_gguf_spec(model)
    progress = progress or Progress(model)
    path = gguf_cache_path(repo, file, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _offline():
        if not path.exists():
            raise DownloadError(f"model {model!r} is not on disk under {path} and HF_HUB_OFFLINE is set")
        return path
    url = hf_hub_url(repo, file, revision=revision, endpoint=_endpoint())
    try:
        meta = get_hf_file_metadata(url)
    except Exception as e:
        raise DownloadError(f"cannot download {file} of {repo}: {e}") from e
    ranges = _GGUFRanges(path, meta.size, meta.etag)
    header, fetched = GGUF_HEADER_GUESS, 0
    while True:   # the header: metadata (the vocabulary among it) and where every tensor lies
        ranges.fetch(url, fetched, min(header, meta.size), progress)
        fetched = min(header, meta.size)
        tensors = _gguf_tensors(path, fetched)
        if tensors is not None or fetched >= meta.size:
            break
        header *= 2
    from appliance.models.gguf_model import GGUF

    gguf = GGUF(path)
    config = ModelConfig.load(path)
    start, end = start or 0, config.num_layers if end is None else end
    names = gguf.tensor_names()
    wanted = [names[n] for n in shard_tensor_names(names, start, end, start == 0 and end > 0,
                                                      end == config.num_layers and end > start,
                                                      config.tie_word_embeddings)]
    wanted += [t for t in tensors if gguf.hf_name(t) is None]   # rope factors: small, every stage reads them
    spans = [(max(a, fetched), b) for a, b in sorted(tensors[t] for t in wanted) if b > fetched]   # (past the header read)
    progress.total = progress.done + sum(b - a for a, b in spans)
    for a, b in spans:
        ranges.fetch(url, a, b, progress)
    progress.send("done")
    return path


def _gguf_tensors(path: Path, header_bytes: int) -> dict[str, tuple[int, int]] | None:
    """Each tensor's byte range, if the file's first `header_bytes` hold the whole header."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception:
        return None
    if reader.data_offset > header_bytes or any(not t.name for t in reader.tensors):
        return None
    return {t.name: (int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors}


class _GGUFRanges:
    """The byte ranges of one sparse file fetched so far, kept beside it so a restart resumes."""

    def __init__(self, path: Path, size: int, etag: str | None):
        self.path, self.state_path = path, path.with_name(path.name + ".ranges.json")
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        if state.get("size") != size or state.get("etag") != etag or not path.exists():
            state = {"size": size, "etag": etag, "done": {}}   # new, or the file changed on the hub
            with open(path, "wb") as f:
                f.truncate(size)
        self.state = state

    def held(self, a: int, b: int) -> int:
        return self.state["done"].get(f"{a}-{b}", 0)

    def fetch(self, url: str, a: int, b: int, progress: Progress, attempts: int = 5) -> None:
        from huggingface_hub.utils import build_hf_headers, get_session

        key = f"{a}-{b}"
        progress.add(self.held(a, b), network=False)
        for attempt in range(attempts):
            done = self.held(a, b)
            if a + done >= b:
                return
            try:
                headers = {**build_hf_headers(), "Range": f"bytes={a + done}-{b - 1}"}
                with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response, \
                        open(self.path, "r+b") as f:
                    response.raise_for_status()
                    f.seek(a + done)
                    for chunk in response.iter_bytes():   # as it arrives: a drop keeps what came
                        chunk = chunk[:b - a - done]
                        f.write(chunk)
                        f.flush()
                        done += len(chunk)
                        self.state["done"][key] = done
                        self._save()
                        progress.add(len(chunk))
                        if a + done >= b:
                            return
            except Exception as e:   # a dropped connection: go on from what arrived
                if attempt == attempts - 1:
                    raise DownloadError(f"cannot download bytes {a}-{b} of {self.path.name}: {e}") from e

    def _save(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_path)


def fetch_all(repo: str, progress: Progress | None = None, revision: str = "main", cache: Path | None = None) -> Path:
    """Everything `exo` needs to serve the whole model from this machine."""
    fetch_for_coordinator(repo, revision, cache)
    return fetch_shard(repo, None, None, progress, revision, cache)
