"""The artifact store: datasets, checkpoints and models under keys, in a folder or an S3-compatible object store.

The database names these files by key (`datasets/{tenant}/{dataset_id}.npz`, `artifacts/{job}/attempt-{n}/model.
safetensors`), never by a local path, so that any process on any machine finds them: in the folder every process
mounts (the default, or a shared filesystem such as NFS) or in the bucket. Every write is atomic: an object is
visible whole or not at all (a rename in a folder; a single PUT, or a multipart upload completed last, in S3).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from core.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

DATASETS, ARTIFACTS = "datasets", "artifacts"  # the two top-level folders (or prefixes) of a store
CHUNK = 1024 * 1024
MULTIPART_BYTES = 16 * 1024 * 1024  # S3: larger files go up in parts of this size, several at once
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 5.0  # backoff between tries of an operation the store could not do


class StorageError(Exception):
    """The store could not do an operation on `key`: the message says which and why."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class ObjectMissing(StorageError):
    """No object under `key`: the database names a file that the store does not hold."""

    def __init__(self, key: str):
        super().__init__(key, f"no object {key!r} in storage")


class StorageUnavailable(StorageError):
    """The store did not answer, or answered that it is overloaded: worth another try later."""


def dataset_key(tenant_id: str, dataset_id: str, suffix: str) -> str:
    return f"{DATASETS}/{tenant_id}/{dataset_id}{suffix}"


def artifact_key(job_id: str, attempt: int, name: str) -> str:
    """The key of a file an attempt wrote (the same layout as the worker's local attempt folder)."""
    return f"{ARTIFACTS}/{job_id}/attempt-{attempt}/{name}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StoredObject:
    """An object being read: its size, and its bytes in chunks (close the iterator, or read it to the end)."""

    size: int
    chunks: Iterator[bytes]


class Store(ABC):
    """Files under keys; `put_file` publishes atomically and `fetch` never leaves half a file at its destination."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        """Store the file at `path` under `key`, replacing what was there. `move`: the caller no longer needs
        `path` (a folder store then renames it instead of copying)."""

    @abstractmethod
    def fetch(self, key: str, dest: Path) -> None:
        """Copy the object to the local file `dest` (written beside it, then renamed into place)."""

    @abstractmethod
    def read(self, key: str) -> StoredObject:
        """The object's size and bytes, for streaming it to a client."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; nothing happens when there is none."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError unless the store can take files now (the readiness probe)."""

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the store is a folder on this machine (it may not exist); None otherwise."""
        return None

    def presign(self, key: str, expires_s: int, filename: str) -> str | None:
        """A URL that downloads the object without credentials for `expires_s`; None when the store has none."""
        return None

    def materialize(self, key: str, folder: Path, name: str) -> Path:
        """A local file with the object's content: the object's own file in a folder store, else a download to
        `folder/name`. ObjectMissing when there is no such object."""
        path = self.local_path(key)
        if path is None:
            self.fetch(key, folder / name)
            return folder / name
        if not path.is_file():
            raise ObjectMissing(key)
        return path


class LocalStore(Store):
    """A folder per top-level prefix (`datasets`, `artifacts`), on this machine or on a shared filesystem."""

    def __init__(self, roots: dict[str, Path]):
        self.roots = roots

    def __repr__(self) -> str:
        return f"LocalStore({', '.join(f'{k}={v}' for k, v in self.roots.items())})"

    def local_path(self, key: str) -> Path:
        top, *rest = key.split("/")
        if top not in self.roots or not rest or any(part in ("..", ".", "") for part in rest):
            raise ValueError(f"not a storage key: {key!r}")
        return self.roots[top].joinpath(*rest)

    def check(self) -> None:
        for top, folder in self.roots.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _os_error(top, "create", exc) from exc
            if not os.access(folder, os.W_OK | os.X_OK):
                raise StorageError(top, f"{folder} is not writable")

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        dest = self.local_path(key)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() and dest.samefile(path):
                return  # the worker wrote it in place: the default, where its attempt folder is the store's
            if move:
                try:
                    os.replace(path, dest)  # one filesystem: a rename, atomic and free
                    _fsync_dir(dest.parent)
                    return
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
            _copy_atomically(path, dest)
            if move:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise _os_error(key, "store", exc) from exc

    def fetch(self, key: str, dest: Path) -> None:
        try:
            _copy_atomically(self.local_path(key), dest)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise _os_error(key, "read", exc) from exc

    def read(self, key: str) -> StoredObject:
        path = self.local_path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the chunk iterator
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as exc:
            raise _os_error(key, "read", exc) from exc
        return StoredObject(os.fstat(f.fileno()).st_size, _file_chunks(f))

    def delete(self, key: str) -> None:
        try:
            self.local_path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _os_error(key, "delete", exc) from exc


class S3Store(Store):
    """Objects under `prefix` in an S3 bucket (AWS, or any store that speaks the protocol: MinIO, Ceph, R2), through
    boto3. Credentials and the region come from the usual AWS_* variables and files."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        config = Config(
            connect_timeout=5,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            signature_version="s3v4",  # presigned URLs too: every region and every S3-compatible store takes it
            s3={"addressing_style": "path"} if endpoint_url else None,  # MinIO and friends answer on one host name
        )
        self.client = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            error = _s3_error(self.bucket, "reach the bucket", exc)
            if isinstance(error, ObjectMissing):
                error = StorageError(self.bucket, f"no bucket {self.bucket!r}")
            raise error from exc

    def put_file(self, key: str, path: Path, *, move: bool = False) -> None:
        try:
            # Multipart above MULTIPART_BYTES: the object appears only when the last part is in, and s3transfer
            # aborts the upload when a part fails, so no partial object is ever visible.
            self.client.upload_file(str(path), self.bucket, self._name(key), Config=self.transfer)
        except Exception as exc:
            raise _s3_error(key, "store", exc) from exc
        if move:
            path.unlink(missing_ok=True)

    def fetch(self, key: str, dest: Path) -> None:
        obj = self.read(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "wb") as f:
                for chunk in obj.chunks:
                    f.write(chunk)
            if tmp.stat().st_size != obj.size:
                raise StorageUnavailable(key, f"{key!r}: the download ended after {tmp.stat().st_size} bytes")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, key: str) -> StoredObject:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise _s3_error(key, "read", exc) from exc
        return StoredObject(response["ContentLength"], self._chunks(key, response["Body"]))

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK)
        except Exception as exc:
            raise _s3_error(key, "read", exc) from exc
        finally:
            body.close()

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as exc:
            raise _s3_error(key, "delete", exc) from exc

    def presign(self, key: str, expires_s: int, filename: str) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ResponseContentDisposition": f'attachment; filename="{filename}"',
        }
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)


def open_store(settings: Settings) -> Store:
    """The store `settings.storage_url` names: by default the folders dataset_dir and artifact_dir."""
    url = settings.storage_url
    if not url:
        return LocalStore({DATASETS: settings.dataset_dir, ARTIFACTS: settings.artifact_dir})
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage_url {url!r}: name the bucket, as in s3://bucket/prefix")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=settings.s3_endpoint_url)
    if parsed.scheme in ("", "file"):
        root = Path(parsed.path if parsed.scheme == "file" else url).expanduser().resolve()
        return LocalStore({DATASETS: root / DATASETS, ARTIFACTS: root / ARTIFACTS})
    raise ValueError(f"storage_url {url!r}: use a folder, file:///folder or s3://bucket/prefix")


def retrying(action: Callable[[], T], *, within_s: float, what: str) -> T:
    """`action()`, tried again with exponential backoff and jitter while the store is unavailable, for at most
    `within_s` seconds; then its last StorageUnavailable is raised. Other errors are raised at once."""
    deadline = time.monotonic() + within_s
    delay = RETRY_FIRST_S
    while True:
        try:
            return action()
        except StorageUnavailable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            pause = min(left, random.uniform(delay / 2, delay))
            log.warning("%s: %s; trying again in %.1f s", what, exc, pause)
            time.sleep(pause)
            delay = min(delay * 2, RETRY_MAX_S)


class DatasetCache:
    """Datasets fetched from a remote store, kept on this machine under their content hash (verified on arrival),
    the least recently used evicted once the folder holds more than `max_bytes`. A folder store needs none: its
    files are read where they are."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes

    def path(self, store: Store, key: str, sha256: str | None) -> Path:
        """A local file holding the dataset stored under `key`. ObjectMissing, StorageUnavailable, or a StorageError
        when the bytes that arrived are not the ones uploaded."""
        if store.local_path(key) is not None:
            return store.materialize(key, self.folder, PurePosixPath(key).name)
        name = f"{sha256 or hashlib.sha256(key.encode()).hexdigest()}{PurePosixPath(key).suffix}"
        path = self.folder / name
        try:
            os.utime(path)  # recently used
            return path
        except FileNotFoundError:  # not fetched yet, or just evicted by another job
            pass
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{secrets.token_hex(4)}.part"
        try:
            store.fetch(key, tmp)
            if sha256 is not None and (got := sha256_file(tmp)) != sha256:
                raise StorageError(key, f"{key!r} arrived with sha256 {got[:12]}..., not {sha256[:12]}... as uploaded")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path) -> None:
        """Delete the least recently used entries until the cache fits in max_bytes (never `keep`)."""
        entries = []
        for entry in self.folder.iterdir():
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            if entry.is_file() and not entry.name.startswith("."):
                entries.append((st.st_mtime, st.st_size, entry))
        total = sum(size for _, size, _ in entries)
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)  # a job reading it keeps its open file; a later one fetches it again
                total -= size


# ------------------------------------------------------------------------------------------------ errors

TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling", "ThrottlingException",
     "RequestTimeTooSkewed", "503", "500", "502", "504"}
)  # fmt: skip
# Only the store's own word for a missing key: a bare 404 may as well come from a wrong endpoint or a proxy, and
# taking it for a missing checkpoint would start a job over instead of failing it.
MISSING_S3_CODES = frozenset({"NoSuchKey"})
# A folder store on a network filesystem that is away for now; other OS errors (no space, no permission, no such
# source file) stay as they are until someone acts.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.EHOSTDOWN,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED, errno.ECONNRESET})  # fmt: skip


def _s3_error(key: str, doing: str, exc: BaseException) -> StorageError:
    """A StorageError for what boto3 raised: ObjectMissing, StorageUnavailable (no connection, 5xx, throttling),
    or a plain StorageError (no access, no bucket, a local file error: something to fix, not worth another try)."""
    from botocore.exceptions import BotoCoreError, ClientError

    for e in _chain(exc):  # s3transfer wraps the client's error in its own
        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in MISSING_S3_CODES:
                return ObjectMissing(key)
            cls = StorageUnavailable if code in TRANSIENT_S3_CODES else StorageError
            return cls(key, f"cannot {doing} {key!r}: {code}: {e.response.get('Error', {}).get('Message', '')}")
        if isinstance(e, BotoCoreError | ConnectionError | TimeoutError):  # the network between us and the store
            return StorageUnavailable(key, f"cannot {doing} {key!r}: {_first_line(e)}")
    try:
        from urllib3.exceptions import HTTPError

        if any(isinstance(e, HTTPError) for e in _chain(exc)):  # a body cut off mid-read
            return StorageUnavailable(key, f"cannot {doing} {key!r}: {_first_line(exc)}")
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    return StorageError(key, f"cannot {doing} {key!r}: {type(exc).__name__}: {_first_line(exc)}")


def _os_error(key: str, doing: str, exc: OSError) -> StorageError:
    cls = StorageUnavailable if exc.errno in TRANSIENT_ERRNOS else StorageError
    return cls(key, f"cannot {doing} {key!r}: {exc.strerror or exc}")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------ files


def _copy_atomically(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(dest.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK):
            yield chunk
