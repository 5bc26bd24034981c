"""POST/GET /v1/datasets: .npz, .csv and image .zip uploads, validation, size limit, and use in a job."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from core.config import Settings
from tests.factories import make_spec, npz_bytes


def upload(client: TestClient, filename: str, content: bytes, **fields: str):
    return client.post("/v1/datasets", files={"file": (filename, content)}, data=fields)


def stored_files(settings: Settings) -> list[str]:
    folder = settings.dataset_dir / "default"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def images_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in ("cat", "dog"):
            for i in range(3):
                img = io.BytesIO()
                Image.fromarray(np.full((6, 5, 3), 40 * i, dtype=np.uint8)).save(img, format="PNG")
                zf.writestr(f"pets/{label}/{i}.png", img.getvalue())
    return buf.getvalue()


def test_npz_upload_is_described_stored_and_readable(client: TestClient, settings: Settings):
    r = upload(client, "features.npz", npz_bytes(n=60, features=6, classes=3), name="my features")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert r.headers["location"] == f"/v1/datasets/{ds['id']}" and ds["id"].startswith("ds_")
    assert (ds["name"], ds["filename"], ds["size_bytes"]) == ("my features", "features.npz", len(npz_bytes()))
    assert ds["sha256"] == hashlib.sha256(npz_bytes()).hexdigest()
    expected = {"shape": [6], "kind": "vector", "n_examples": 60, "n_classes": 3, "classes": ["0", "1", "2"]}
    assert ds["description"].items() >= expected.items()
    assert stored_files(settings) == [f"{ds['id']}.npz"]
    assert Path(settings.dataset_dir / "default" / f"{ds['id']}.npz").read_bytes() == npz_bytes()
    assert client.get(f"/v1/datasets/{ds['id']}").json() == ds
    assert [d["id"] for d in client.get("/v1/datasets").json()["items"]] == [ds["id"]]


def test_csv_upload_with_its_label_column(client: TestClient):
    rows = "a,b,target\n" + "".join(f"{i},{i * 2},{'yes' if i % 2 else 'no'}\n" for i in range(10))
    r = upload(client, "table.csv", rows.encode(), label_column="target")
    assert r.status_code == 201, r.text
    description = r.json()["description"]
    assert description["shape"] == [2] and description["classes"] == ["no", "yes"]
    assert description["label_column"] == "target" and r.json()["name"] == "table"


def test_zip_of_class_folders_is_an_image_dataset(client: TestClient):
    r = upload(client, "pets.zip", images_zip())
    assert r.status_code == 201, r.text
    description = r.json()["description"]
    assert description["kind"] == "image" and description["shape"] == [3, 6, 5]
    assert description["classes"] == ["cat", "dog"] and description["n_examples"] == 6


@pytest.mark.parametrize(
    ("filename", "content", "fields", "path"),
    [
        ("data.txt", b"1,2,3", {}, "file"),
        ("data.npz", b"not a zip archive", {}, "file"),
        ("table.csv", b"a,b,label\n1,2,x\n", {"label_column": "target"}, "label_column"),
        ("one-class.npz", npz_bytes(classes=1), {}, "file"),
        ("pets.zip", b"PK\x03\x04 broken", {}, "file"),
    ],
)
def test_unusable_uploads_are_422_and_leave_no_file(
    client: TestClient, settings: Settings, filename: str, content: bytes, fields: dict, path: str
):
    r = upload(client, filename, content, **fields)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_dataset"
    assert [d["path"] for d in r.json()["error"]["details"]] == [path]
    assert ".upload-" not in r.json()["error"]["message"]  # the user's file name, not our temporary one
    assert stored_files(settings) == []


def test_form_without_a_file_or_not_multipart(client: TestClient):
    r = client.post("/v1/datasets", data={"name": "x"}, files={"other": ("x.npz", b"1")})
    assert r.status_code == 422 and r.json()["error"]["details"][0]["path"] == "file"
    r = client.post("/v1/datasets", json={"file": "x"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = client.post(
        "/v1/datasets", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_uploads_over_the_limit_are_413_before_being_read_whole(client: TestClient, settings: Settings):
    big = npz_bytes(n=30_000, features=8)  # about 2 MiB, over max_upload_mb = 1
    r = upload(client, "big.npz", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"  # by Content-Length
    body, content_type = _multipart("big.npz", big)
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))  # no Content-Length: counted as it comes
    r = client.post("/v1/datasets", content=chunks, headers={"content-type": content_type})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert stored_files(settings) == []


def test_file_limit_is_exact_even_when_the_request_is_within_the_framing_allowance(make_client, settings: Settings):
    client = make_client()
    content = b"x" * (2**20 + 1)  # one byte over 1 MiB; the request as a whole passes the body limit
    body, content_type = _multipart("big.csv", content)
    r = client.post("/v1/datasets", content=body, headers={"content-type": content_type})
    assert r.status_code == 413 and stored_files(settings) == []


def test_unknown_dataset_and_bad_cursor(client: TestClient):
    r = client.get("/v1/datasets/ds_nosuchdataset1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/datasets", params={"cursor": "%%%"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_cursor"


def test_datasets_page(client: TestClient):
    made = [upload(client, f"d{i}.npz", npz_bytes()).json()["id"] for i in range(3)]
    first = client.get("/v1/datasets", params={"limit": 2}).json()
    second = client.get("/v1/datasets", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [d["id"] for d in first["items"] + second["items"]] == made[::-1] and second["next_cursor"] is None


def test_an_uploaded_dataset_can_be_trained_on(client: TestClient):
    ds = upload(client, "features.npz", npz_bytes()).json()
    r = client.post("/v1/jobs", json=make_spec(data={"dataset": ds["id"]}))
    assert r.status_code == 201 and r.json()["spec"]["data"]["dataset"] == ds["id"]


def _multipart(filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = "trickserve-test-boundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n\r\n'
    return head.encode() + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
