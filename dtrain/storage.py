"""Run directories in object storage: `runs_dir=s3://bucket/prefix`, `gs://bucket/prefix`, or any URI pyarrow.fs
opens (docs/storage.md). A plain path stays a local (or shared) folder and never comes here.

A `RunStore` is one folder in such storage, opened with pyarrow's filesystem for its URI. Credentials come from
each cloud SDK's usual environment variables and files, on the driver and on every node; a store pickles as its
URI alone (each process opens its own filesystem), so no key travels inside a job or lands in a file.
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlparse

from dtrain.errors import ConfigError, first_line

SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def is_uri(location: str | Path) -> bool:
    """True for a URI with a scheme other than file:// (a run dir in object storage)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def join(base: str | Path, *names: str) -> str | Path:
    """base/names for a local path or a URI (pathlib would fold a URI's '//')."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *names])
    return Path(base).joinpath(*names)


def split(uri: str) -> tuple[str, str]:
    """(parent URI, last name) of a URI."""
    parent, _, name = str(uri).rstrip("/").rpartition("/")
    return parent, name


class RunStore:
    """A folder at a URI: small files read and written whole, folders uploaded and downloaded."""

    def __init__(self, uri: str, key: str = "runs_dir") -> None:
        self.uri, self.key = str(uri).rstrip("/"), key
        self.fs, self.path = open_uri(self.uri, key)

    def __getstate__(self) -> dict[str, str]:
        return {"uri": self.uri, "key": self.key}  # each process opens its own filesystem from its environment

    def __setstate__(self, state: dict[str, str]) -> None:
        self.__init__(state["uri"], state["key"])

    def __str__(self) -> str:
        return self.uri

    def child(self, name: str) -> RunStore:
        return RunStore(f"{self.uri}/{name}", self.key)

    def _at(self, rel: str) -> str:
        return posixpath.join(self.path, rel) if rel else self.path

    def exists(self, rel: str = "") -> bool:
        from pyarrow.fs import FileType

        return self.fs.get_file_info(self._at(rel)).type != FileType.NotFound

    def mtime(self, rel: str) -> float | None:
        """When the object was last written (seconds since the epoch), or None if there is none."""
        info = self.fs.get_file_info(self._at(rel))
        return info.mtime.timestamp() if info.mtime is not None else None

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's content, or None if there is none."""
        try:
            with self.fs.open_input_stream(self._at(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.fs.open_output_stream(self._at(rel)) as f:
            f.write(data)

    def remove(self, rel: str) -> None:
        """Delete the object rel, if there is one."""
        try:
            self.fs.delete_file(self._at(rel))
        except FileNotFoundError:
            pass

    def folders(self, prefix: str) -> list[str]:
        """Names of the folders directly in this one whose name starts with prefix."""
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == FileType.Directory and i.base_name.startswith(prefix))

    def upload(self, local: Path, rel: str = "") -> None:
        """Copy the local folder's files (recursively) under rel, replacing objects of the same names."""
        from pyarrow.fs import LocalFileSystem, copy_files

        if any(Path(local).iterdir()):
            copy_files(str(local), self._at(rel), source_filesystem=LocalFileSystem(), destination_filesystem=self.fs)

    def upload_file(self, local: Path, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def download(self, rel: str, local: Path, top_only: bool = False) -> Path:
        """Copy the folder rel (all of it, or only its files at the top with top_only) into local; returns local."""
        from pyarrow.fs import FileSelector, FileType

        local.mkdir(parents=True, exist_ok=True)
        base = self._at(rel)
        infos = self.fs.get_file_info(FileSelector(base, recursive=not top_only, allow_not_found=True))
        for info in infos:
            if info.type == FileType.File:
                target = local / posixpath.relpath(info.path, base)
                target.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        return local

    def delete(self) -> None:
        """Remove the folder and everything under it."""
        self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
        try:
            self.fs.delete_dir(self.path)
        except OSError:
            pass  # object stores have no empty folders to remove


def read_text(folder: str | Path | RunStore, name: str) -> str | None:
    """The text of file name in a local folder or a store, or None if there is none."""
    if isinstance(folder, RunStore):
        data = folder.read_bytes(name)
        return None if data is None else data.decode()
    path = Path(folder) / name
    return path.read_text() if path.is_file() else None


def write_text(folder: Path | RunStore, name: str, text: str) -> None:
    """Write file name in a local folder or a store, whole."""
    if isinstance(folder, RunStore):
        folder.write_bytes(name, text.encode())
    else:
        (Path(folder) / name).write_text(text)


def subfolders(folder: Path | RunStore, prefix: str) -> list[Path | RunStore]:
    """The folders directly in a local folder or a store whose name starts with prefix, by name."""
    if isinstance(folder, RunStore):
        return [folder.child(name) for name in folder.folders(prefix)]
    return sorted(p for p in Path(folder).glob(f"{prefix}*") if p.is_dir()) if Path(folder).is_dir() else []


def open_uri(uri: str, key: str = "runs_dir") -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for uri; ConfigError naming key for a URI nothing opens or one that
    holds credentials (which would end up in config.yaml)."""
    parsed = urlparse(uri)
    secret = [k for k, _ in parse_qsl(parsed.query) if any(w in k.lower() for w in SECRET_WORDS)]
    if parsed.username or parsed.password or secret:
        raise ConfigError(f"{key}: {_safe(uri)} holds credentials; they would be written into config.yaml: leave "
                          "them to the cloud SDK's environment variables or config files (docs/storage.md)")
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ValueError by scheme
        raise ConfigError(f"{key}: no filesystem opens {uri} ({first_line(err)}); expected a local folder, "
                          "s3://bucket/prefix, gs://bucket/prefix or another URI pyarrow.fs opens") from None


def _safe(uri: str) -> str:
    parsed = urlparse(uri)
    return f"{parsed.scheme}://{parsed.hostname or ''}{parsed.path}"


def probe(uri: str, key: str = "runs_dir") -> RunStore:
    """The store at uri, after writing and deleting a small object there (on the driver, before Ray starts): an
    unknown bucket, missing credentials or no write permission is a ConfigError naming key."""
    store = RunStore(uri, key)
    name = f".dtrain-probe-{uuid.uuid4().hex[:8]}"
    try:
        store.write_bytes(name, b"dtrain write probe\n")
        store.remove(name)
    except Exception as err:  # noqa: BLE001 - pyarrow raises OSError with the cloud SDK's message
        raise ConfigError(f"{key}: cannot write to {uri}: {_reason(err)}") from None
    return store


def _reason(err: BaseException) -> str:
    """The cloud SDK's error in a few words (pyarrow's messages carry request ids and long explanations)."""
    text = first_line(err)
    known = {"NO_SUCH_BUCKET": "the bucket does not exist", "ACCESS_DENIED": "access denied (credentials missing, "
             "unknown, or without write permission on this prefix)", "INVALID_ACCESS_KEY_ID": "the access key is "
             "not known (check the credentials in the environment or the SDK's config files)",
             "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
             "NETWORK_CONNECTION": "the storage endpoint cannot be reached"}
    for code, words in known.items():
        if code in text:
            return words
    return text[:200]


class Mirror:
    """Rank 0's files of a run, written to a local staging folder and copied to the run's store: metrics.jsonl
    (and summary.json) as training goes, so the driver's progress bar can follow; everything (W&B's offline run,
    profiles) when the run ends. A tracker sink: it is handed every event after the other sinks."""

    def __init__(self, store: RunStore, staging: Path, every_s: float = 2.0) -> None:
        self.store, self.staging, self.every_s = store, Path(staging), every_s
        self._last = 0.0

    def log(self, record: dict[str, Any]) -> None:
        now = time.monotonic()
        if record.get("event") in ("stage", "epoch", "end", "resume") or now - self._last >= self.every_s:
            self._last = now
            for name in ("metrics.jsonl", "summary.json"):
                if (self.staging / name).is_file():
                    self.store.upload_file(self.staging / name, name)

    def finish(self, failed: bool = False) -> None:
        self.store.upload(self.staging)


def staging_dir(store: RunStore) -> Path:
    """A fresh local folder for rank 0's files of the run at store, holding the files its earlier processes left
    at the store's top (metrics.jsonl, tracker ids: a resumed or restarted run appends to them)."""
    folder = Path(tempfile.mkdtemp(prefix=f"dtrain-{split(store.uri)[1]}-"))
    return store.download("", folder, top_only=True)
