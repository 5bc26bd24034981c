"""Resource limits: bodies and uploads (413, also streamed without an end), pages, active jobs (429 with
Retry-After), caps on what a spec may ask for, dataset caps and quota, GET /v1/quotas, hostile uploads."""

from __future__ import annotations

import io
import pickle
import select
import socket
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.config import Settings
from tests.factories import make_spec, npz_bytes

CHUNK = 16 * 1024


def upload(client: TestClient, filename: str, content: bytes):
    return client.post("/v1/datasets", files={"file": (filename, content)})


def send_without_end(url: str, path: str, headers: dict[str, str], head: bytes, total: int) -> tuple[int, int]:
    """POST a chunked body of `head` then `total` filler bytes, chunk by chunk, never sending the final chunk;
    stop as soon as an answer arrives. Returns (status, bytes sent): the server answered an unfinished body."""
    parts = urlsplit(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", "Transfer-Encoding: chunked"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent = 0
        for chunk in [head] + [b"1" * CHUNK] * (total // CHUNK):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            if select.select([sock], [], [], 0.02)[0]:  # answered: send no more
                break
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1]), sent


# --------------------------------------------------------------------------------------- bodies, pages


def test_json_body_over_the_limit_is_413_by_content_length(client: TestClient):
    r = client.post("/v1/jobs", json={**make_spec(), "name": "x" * 70_000})  # max_body_kb = 64
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("route", ["/v1/jobs", "/v1/datasets"])
def test_a_streamed_body_is_cut_off_at_the_limit_before_it_ends(make_server: Callable[..., Any], route: str):
    served = make_server()
    with served.client() as http:
        auth = http.headers["authorization"]
    if route == "/v1/jobs":
        headers, head, limit = {"Content-Type": "application/json"}, b'{"name": "', 64 * 1024
    else:
        boundary = "b0undary"
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.csv"\r\n\r\n'.encode()
        limit = 2**20
    status, sent = send_without_end(served.url, route, {**headers, "Authorization": auth}, head, total=8 * limit)
    assert status == 413
    assert sent < 2 * limit  # the answer came right after the limit, not after the whole (endless) body


def test_page_size_over_the_maximum_is_422(client: TestClient):
    job = client.post("/v1/jobs", json=make_spec()).json()["id"]
    for url in ("/v1/jobs", "/v1/datasets", f"/v1/jobs/{job}/metrics"):
        r = client.get(url, params={"limit": 10**6})
        assert r.status_code == 422, url


# ---------------------------------------------------------------------------------------- active jobs


def test_active_jobs_over_the_quota_are_429_with_retry_after(make_client: Callable[..., TestClient]):
    client = make_client(max_active_jobs_per_tenant=2, retry_after_s=17)
    first = client.post("/v1/jobs", json=make_spec()).json()
    client.post("/v1/jobs", json=make_spec())
    r = client.post("/v1/jobs", json=make_spec())
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_active_jobs"
    assert r.headers["retry-after"] == "17"
    client.post(f"/v1/jobs/{first['id']}/cancel")  # a finished job frees its place
    assert client.post("/v1/jobs", json=make_spec()).status_code == 201


# ----------------------------------------------------------------------------------------------- caps


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"train": {"epochs": 51}}, "train.epochs"),
        ({"resources": {"max_runtime_s": 7201}}, "resources.max_runtime_s"),
        ({"data": {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 1001}}}, "data.synthetic.n_samples"),
    ],
)
def test_specs_over_the_caps_are_422_naming_the_field(
    make_client: Callable[..., TestClient], overrides: dict[str, Any], path: str
):
    client = make_client(max_epochs=50, max_runtime_s=7200, max_dataset_examples=1000)
    for route in ("/v1/jobs", "/v1/specs/validate"):
        r = client.post(route, json=make_spec(**overrides))
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_spec"
        assert [d["path"] for d in r.json()["error"]["details"]] == [path]
    assert client.get("/v1/jobs").json()["items"] == []


def test_specs_at_the_caps_are_accepted(make_client: Callable[..., TestClient]):
    client = make_client(max_epochs=50, max_runtime_s=600, max_dataset_examples=1000)
    spec = make_spec(train={"epochs": 50}, resources={"max_runtime_s": 600})
    spec["data"] = {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 1000}}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201


def test_datasets_over_the_example_cap_are_422(make_client: Callable[..., TestClient]):
    client = make_client(max_dataset_examples=50)
    r = upload(client, "d.npz", npz_bytes(n=60))
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"] == "file"
    assert upload(client, "d.npz", npz_bytes(n=50)).status_code == 201


def test_dataset_storage_quota_is_413(make_client: Callable[..., TestClient]):
    client = make_client(max_dataset_storage_mb=1)
    rows = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(80_000))  # about 0.6 MiB
    assert upload(client, "a.csv", rows.encode()).status_code == 201
    r = upload(client, "b.csv", rows.encode())
    assert r.status_code == 413 and r.json()["error"]["code"] == "storage_quota_exceeded"
    assert client.get("/v1/quotas").json()["usage"]["datasets"] == 1


def test_quotas_show_the_limits_and_the_current_use(make_client: Callable[..., TestClient]):
    client = make_client(max_active_jobs_per_tenant=7, max_epochs=40)
    client.post("/v1/jobs", json=make_spec())
    upload(client, "d.npz", npz_bytes())
    quotas = client.get("/v1/quotas").json()
    assert quotas["tenant"] == "default"
    assert quotas["limits"]["max_active_jobs"] == 7 and quotas["limits"]["max_epochs"] == 40
    assert quotas["limits"]["max_upload_bytes"] == 2**20 and quotas["limits"]["max_page_size"] == 100
    assert quotas["usage"] == {"active_jobs": 1, "open_streams": 0, "datasets": 1, "dataset_bytes": len(npz_bytes())}


# ------------------------------------------------------------------------------------- hostile uploads


def image_zip(names: list[str]) -> bytes:
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(png, format="PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name in names:
            zf.writestr(name, png.getvalue())
    return buf.getvalue()


def declared_huge(archive: bytes) -> bytes:
    """The archive with every central-directory entry claiming to unpack to almost 4 GiB (a zip bomb's header)."""
    data, at = bytearray(archive), 0
    while (at := data.find(b"PK\x01\x02", at)) != -1:
        struct.pack_into("<I", data, at + 24, 0xFFFF0000)  # uncompressed size
        at += 4
    return bytes(data)


def test_zip_with_a_path_outside_the_archive_is_422(client: TestClient, settings: Settings):
    r = upload(client, "evil.zip", image_zip(["a/0.png", "b/0.png", "../x.png"]))
    assert r.status_code == 422 and "unsafe path" in r.json()["error"]["message"]
    assert not (settings.dataset_dir / "x.png").exists() and not (settings.dataset_dir.parent / "x.png").exists()


def test_zip_declaring_a_huge_size_is_413(client: TestClient):
    r = upload(client, "bomb.zip", declared_huge(image_zip(["a/0.png", "b/0.png"])))
    assert r.status_code == 413 and r.json()["error"]["code"] == "dataset_too_large"
    assert "unpack to 8.0 GiB; at most 2.0 GiB" in r.json()["error"]["message"]


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def hostile_files(sentinel: Path) -> dict[str, bytes]:
    object_npz = io.BytesIO()
    np.savez(object_npz, x=np.array([Payload(sentinel)] * 4, dtype=object), y=np.arange(4))
    return {
        "pickle.npz": pickle.dumps(Payload(sentinel)),  # a bare pickle named .npz
        "objects.npz": object_npz.getvalue(),  # a real .npz whose array is pickled objects
        "weights.safetensors": struct.pack("<Q", 2**40) + b"{}",  # a giant header; not a dataset type at all
    }


def test_pickles_in_uploads_never_run(client: TestClient, tmp_path: Path):
    sentinel = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(Payload(sentinel))) and sentinel.exists()  # the payload does work...
    sentinel.unlink()
    for filename, content in hostile_files(sentinel).items():
        r = upload(client, filename, content)
        assert 400 <= r.status_code < 500 and r.json()["error"]["code"] == "invalid_dataset", filename
    assert not sentinel.exists()  # ...but the service never unpickled it
    assert client.get("/v1/datasets").json()["items"] == []
