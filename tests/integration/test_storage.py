"""Workers on other machines: an API and two workers, each with a home folder of its own, that share only the
database, the broker and the artifact store, in both kinds of store: a folder (as a shared filesystem would be)
and S3 (moto's server, a real S3-protocol endpoint over HTTP in a process of its own, since no MinIO server
installs here; the code path is the production one, boto3 against an endpoint URL).

A dataset uploaded to the API trains on a worker; the worker is killed with SIGKILL mid-job and a second worker,
with a third home, resumes the job from the checkpoint in the store, exactly (its weights equal those of an
uninterrupted run); the API serves the model the second worker stored. On S3 the store is also cut off for a while
mid-job: the checkpoints taken meanwhile are not pointed at, and nothing is lost."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load

from core.engine import train
from core.spec import JobSpec
from tests.factories import wait_for
from tests.integration.conftest import Service, _databases, close, configure
from tests.integration.test_reliability import assert_one_point_per_step, assert_resumed_once, checkpoint_after
from tests.s3 import Proxy

pytestmark = pytest.mark.integration
EPOCHS = 8


def dataset() -> bytes:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 10)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    return buf.getvalue()


def spec(dataset_id: str) -> dict:
    return {
        "name": "across machines",
        "data": {"dataset": dataset_id},
        "model": {"arch": "mlp", "layers": [32]},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": EPOCHS, "batch_size": 4, "progress_interval_s": 0.05, "seed": 7},
        "resources": {"device": "cpu"},
    }


@pytest.fixture(params=["folder", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict[str, str], Proxy | None]]:
    """TRICKSERVE_* settings of the store every process shares, and the proxy in front of S3 (None for a folder)."""
    if request.param == "folder":
        yield {"STORAGE_URL": str(tmp_path / "shared-storage")}, None
        return
    s3_url = request.getfixturevalue("s3_url")
    proxy = Proxy(request.getfixturevalue("moto_server").port)
    yield {"STORAGE_URL": s3_url, "S3_ENDPOINT_URL": proxy.url, "STORAGE_RETRY_S": "1"}, proxy
    proxy.close()


@pytest.fixture
def service(storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _migrated_sqlite: Path) -> Iterator[Service]:
    """PostgreSQL and Redis, as machines apart would share them; the API's home is `api-home`."""
    with _databases("production", tmp_path, _migrated_sqlite) as (database_url, broker_url):
        service = configure(monkeypatch, tmp_path / "api-home", database_url, broker_url, broker_url, **storage[0])
        yield service
        close(service)


def test_a_job_moves_between_workers_with_homes_of_their_own(service, storage, start_api, start_worker, tmp_path):
    proxy = storage[1]
    api = start_api(service)
    client = api.client()
    content = dataset()
    upload = client.post("/v1/datasets", files={"file": ("two-features.npz", content)})
    assert upload.status_code == 201, upload.text
    r = client.post("/v1/jobs", json=spec(upload.json()["id"]))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]

    first = start_worker(TRICKSERVE_HOME=str(tmp_path / "worker-a-home"))
    ckpt = wait_for(lambda: checkpoint_after(service, job_id), timeout=60, what="the first checkpoint")
    if proxy is not None:  # the store goes away for a while: checkpoints taken meanwhile are not pointed at
        proxy.cut()
        wait_for(lambda: _not_stored(service, job_id), timeout=30, what="a checkpoint not stored")
        assert service.load(job_id).checkpoint_step == ckpt
        proxy.restore()
        ckpt = wait_for(lambda: checkpoint_after(service, job_id, ckpt), timeout=30, what="a checkpoint once back")
    wait_for(lambda: service.events(job_id, "progress")[-1].step > ckpt, what="progress past the checkpoint")
    first.kill()
    checkpoint_step = service.load(job_id).checkpoint_step

    second = start_worker(TRICKSERVE_HOME=str(tmp_path / "worker-b-home"))
    done = service.wait_terminal(job_id, first, second, timeout=90)
    assert (done.status, done.attempt) == ("succeeded", 2), done.failure_message
    everything = assert_one_point_per_step(service, job_id, EPOCHS)
    assert_resumed_once(service, job_id, checkpoint_step, everything)

    model = client.get(f"/v1/jobs/{job_id}/model")
    assert model.status_code == 200, model.text
    assert_same_weights(load(model.content), uninterrupted(spec(upload.json()["id"]), content, tmp_path / "ref"))
    # The API's home holds no dataset or model; the attempt folder of the worker that finished was scratch, gone.
    assert _files(tmp_path / "api-home", "*.npz", "*.safetensors", "*.pt") == []
    assert _files(tmp_path / "worker-b-home" / "artifacts", "*") == []
    client.close()


def _not_stored(service: Service, job_id: str) -> bool:
    return any("not stored" in e.data.get("message", "") for e in service.events(job_id, "warning"))


def _files(folder: Path, *patterns: str) -> list[Path]:
    return [p for pattern in patterns for p in folder.rglob(pattern) if p.is_file()]


def uninterrupted(job: dict, content: bytes, folder: Path) -> dict[str, torch.Tensor]:
    """The weights of the same job trained in one go, in this process, on one thread as the workers train."""
    folder.mkdir(parents=True)
    (folder / "data.npz").write_bytes(content)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with OMP_NUM_THREADS=1: other threads sum in another order
    try:
        result = train(JobSpec.model_validate(job), [], out_dir=folder, data_path=str(folder / "data.npz"))
    finally:
        torch.set_num_threads(threads)
    return {name: t.detach() for name, t in result.model.state_dict().items()}


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
