"""The artifact store in both kinds: a folder, and S3 through a real S3-protocol server (moto's, over HTTP)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import httpx
import pytest

from core.artifacts import (
    MULTIPART_BYTES,
    DatasetCache,
    LocalStore,
    ObjectMissing,
    S3Store,
    StorageError,
    StorageUnavailable,
    Store,
    open_store,
    retrying,
)
from core.config import Settings
from tests.s3 import CREDENTIALS as S3_CREDENTIALS
from tests.s3 import Proxy


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "folder":
        return open_store(Settings(home=tmp_path / "home", storage_url=str(tmp_path / "shared")))
    s3_url = request.getfixturevalue("s3_url")
    return _s3(tmp_path, s3_url)


def _s3(tmp_path: Path, s3_url: str, endpoint_url: str | None = None) -> Store:
    endpoint_url = endpoint_url or os.environ["TRICKSERVE_S3_ENDPOINT_URL"]
    return open_store(Settings(home=tmp_path / "home", storage_url=s3_url, s3_endpoint_url=endpoint_url))


def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_a_stored_file_reads_back_fetches_and_is_replaced_whole(store: Store, tmp_path: Path):
    key = "artifacts/job_a/attempt-1/checkpoint.0.pt"
    store.put_file(key, _file(tmp_path / "one", b"first"))
    store.put_file(key, _file(tmp_path / "two", b"second version"))
    obj = store.read(key)
    assert obj.size == 14 and b"".join(obj.chunks) == b"second version"
    store.fetch(key, tmp_path / "copy" / "ck.pt")
    assert (tmp_path / "copy" / "ck.pt").read_bytes() == b"second version"
    assert [p.name for p in (tmp_path / "copy").iterdir()] == ["ck.pt"]  # no temporary file left beside it
    assert (tmp_path / "one").exists()  # put_file copies unless told to move
    store.delete(key)
    store.delete(key)  # nothing to delete: no error
    with pytest.raises(ObjectMissing) as missing:
        store.read(key)
    assert missing.value.key == key


def test_a_missing_object_is_object_missing_for_every_read(store: Store, tmp_path: Path):
    key = "datasets/acme/ds_none.npz"
    with pytest.raises(ObjectMissing):
        store.fetch(key, tmp_path / "x.npz")
    with pytest.raises(ObjectMissing):
        store.materialize(key, tmp_path, "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_a_file_larger_than_a_part_goes_up_in_parts_and_comes_back_identical(store: Store, tmp_path: Path):
    data = os.urandom(MULTIPART_BYTES + 1024 * 1024)
    src = _file(tmp_path / "big.npz", data)
    store.put_file("datasets/acme/ds_big.npz", src, move=True)
    assert not src.exists()  # moved: the spool file is gone
    local = store.materialize("datasets/acme/ds_big.npz", tmp_path / "fetched", "big.npz")
    assert hashlib.sha256(local.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_keys_cannot_leave_the_store_folder(tmp_path: Path):
    store = LocalStore({"datasets": tmp_path / "datasets"})
    for key in ("datasets/../../etc/passwd", "/etc/passwd", "other/x", "datasets", "datasets//x"):
        with pytest.raises(ValueError):
            store.local_path(key)


def test_storage_url_names_a_folder_or_a_bucket(tmp_path: Path):
    default = open_store(Settings(home=tmp_path))
    assert default.local_path("datasets/t/ds_1.npz") == tmp_path / "datasets" / "t" / "ds_1.npz"
    assert default.local_path("artifacts/j/attempt-1/m") == tmp_path / "artifacts" / "j" / "attempt-1" / "m"
    shared = open_store(Settings(home=tmp_path, storage_url=f"file://{tmp_path}/nfs"))
    assert shared.local_path("artifacts/j/attempt-1/m") == tmp_path / "nfs" / "artifacts" / "j" / "attempt-1" / "m"
    s3 = open_store(Settings(home=tmp_path, storage_url="s3://bucket/some/prefix", s3_endpoint_url="http://x:9000"))
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.local_path("artifacts/j/attempt-1/m") is None
    for bad in ("s3:///prefix", "gs://bucket/x"):
        with pytest.raises(ValueError):
            open_store(Settings(home=tmp_path, storage_url=bad))


def test_an_unreachable_store_is_unavailable_and_retried_within_a_bound(s3_url: str, tmp_path: Path):
    proxy = Proxy(int(os.environ["TRICKSERVE_S3_ENDPOINT_URL"].rsplit(":", 1)[1]))
    store = _s3(tmp_path, s3_url, proxy.url)
    src = _file(tmp_path / "ck.pt", b"weights")
    proxy.cut()
    calls = []

    def put() -> None:
        calls.append(1)
        store.put_file("artifacts/j/attempt-1/ck.pt", src)

    with pytest.raises(StorageUnavailable) as unavailable:
        retrying(put, within_s=1.0, what="test")
    assert len(calls) >= 2 and "artifacts/j/attempt-1/ck.pt" in str(unavailable.value)
    proxy.restore()
    retrying(put, within_s=5.0, what="test")
    assert b"".join(store.read("artifacts/j/attempt-1/ck.pt").chunks) == b"weights"
    proxy.close()


def test_a_refusal_that_another_try_cannot_fix_is_not_retried(tmp_path: Path, moto_server, s3_url: str):
    store = _s3(tmp_path, "s3://no-such-bucket-here/x", moto_server.url)
    calls = []

    def put() -> None:
        calls.append(1)
        store.put_file("artifacts/j/attempt-1/ck.pt", _file(tmp_path / "ck.pt", b"w"))

    with pytest.raises(StorageError) as refused:
        retrying(put, within_s=5.0, what="test")
    assert not isinstance(refused.value, StorageUnavailable) and calls == [1]
    assert "NoSuchBucket" in str(refused.value)


def test_a_presigned_url_downloads_the_object_without_credentials(s3_url: str, tmp_path: Path):
    store = _s3(tmp_path, s3_url)
    store.put_file("artifacts/j/attempt-1/model.safetensors", _file(tmp_path / "m", b"weights"))
    url = store.presign("artifacts/j/attempt-1/model.safetensors", 60, "job_j.safetensors")
    r = httpx.get(url)
    assert r.status_code == 200 and r.content == b"weights"
    assert "job_j.safetensors" in r.headers["content-disposition"]
    assert LocalStore({"artifacts": tmp_path}).presign("artifacts/x", 60, "x") is None


def test_the_dataset_cache_fetches_once_verifies_and_evicts_the_least_recently_used(s3_url: str, tmp_path: Path):
    store = _s3(tmp_path, s3_url)
    cache = DatasetCache(tmp_path / "cache", max_bytes=2500)
    sha = {}
    for name in ("a", "b", "c"):
        data = name.encode() * 1000
        store.put_file(f"datasets/t/ds_{name}.npz", _file(tmp_path / name, data))
        sha[name] = hashlib.sha256(data).hexdigest()
    a = cache.path(store, "datasets/t/ds_a.npz", sha["a"])
    assert a.read_bytes() == b"a" * 1000 and a.name == f"{sha['a']}.npz"
    store.delete("datasets/t/ds_a.npz")
    assert cache.path(store, "datasets/t/ds_a.npz", sha["a"]) == a  # from the cache: the store is not asked
    os.utime(a, (1, 1))  # used long ago
    cache.path(store, "datasets/t/ds_b.npz", sha["b"])
    cache.path(store, "datasets/t/ds_c.npz", sha["c"])  # 3000 bytes > 2500: the least recently used goes
    assert sorted(p.name[:8] for p in (tmp_path / "cache").iterdir()) == sorted([sha["b"][:8], sha["c"][:8]])
    with pytest.raises(StorageError, match="not .* as uploaded"):
        store.put_file("datasets/t/ds_x.npz", _file(tmp_path / "x", b"tampered"))
        cache.path(store, "datasets/t/ds_x.npz", hashlib.sha256(b"original").hexdigest())
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no partial file kept


def test_a_bare_404_is_not_taken_for_a_missing_object(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A wrong endpoint (or a proxy) answering 404 without the store's NoSuchKey is a configuration to fix: taking
    it for a missing checkpoint would start a job over instead of failing it."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the standard library's name
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    store = _s3(tmp_path, "s3://bucket/x", f"http://127.0.0.1:{server.server_address[1]}")
    with pytest.raises(StorageError) as error:
        retrying(lambda: store.read("artifacts/j/attempt-1/checkpoint.0.pt"), within_s=5, what="test")
    assert not isinstance(error.value, ObjectMissing | StorageUnavailable) and "404" in str(error.value)
    server.shutdown()


def test_a_local_file_error_is_not_a_store_outage(store: Store, tmp_path: Path):
    with pytest.raises(StorageError) as error:
        retrying(lambda: store.put_file("artifacts/j/attempt-1/m", tmp_path / "never-written"), within_s=5, what="t")
    assert not isinstance(error.value, StorageUnavailable)
