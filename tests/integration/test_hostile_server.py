"""Hostile inputs against a real `trickserve api` process whose address space is capped at 2 GiB: every one gets its
4xx with the error envelope and the field's path, and the process lives on, answering /healthz and real work.

Under the cap an allocation past it fails inside the API (MemoryError, a 500) where an uncapped API on a small
machine would be OOM-killed, taking the embedded service down with it."""

from __future__ import annotations

import functools
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.config import Settings
from core.db import Database
from tests.bombs import npz_declaring, png_bomb_zip, zeros_npz
from tests.factories import make_spec, new_key, npz_bytes, wait_for
from tests.integration.conftest import REPO, ApiServer

pytestmark = pytest.mark.integration

MEMORY_LIMIT = 2 << 30  # bytes of address space; the API maps about 0.8 GiB once torch is imported


class CappedApi(ApiServer):
    """`trickserve api` in a process that may map at most MEMORY_LIMIT bytes."""

    def start(self) -> None:
        argv = [sys.executable, "-m", "cli.main", "api", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_cap_memory)  # fmt: skip
        wait_for(self._answers, timeout=30, what="the API to answer")


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, _migrated_sqlite: Path) -> Iterator[CappedApi]:
    """One capped API on a SQLite home of its own, with the default limits, for every case of this module."""
    home = tmp_path_factory.mktemp("hostile")
    shutil.copy(_migrated_sqlite, home / "trickserve.db")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRICKSERVE_HOME", str(home))
        env.setenv("TRICKSERVE_DATABASE_URL", f"sqlite:///{home / 'trickserve.db'}")
        env.setenv("OMP_NUM_THREADS", "1")
        db = Database.from_settings(Settings())
        server = CappedApi(home / "api.log", new_key(db.sessions, "hostile"))
        try:
            yield server
        finally:
            server.stop(signal.SIGKILL)
            db.dispose()


@dataclass(frozen=True)
class Case:
    """A hostile request and the answer it must get."""

    send: Callable[[httpx.Client], httpx.Response]
    status: int
    code: str
    path: str


def spec(body: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})


def upload(filename: str, content: Callable[[], bytes], **fields: str) -> Callable[[httpx.Client], httpx.Response]:
    return lambda c: c.post("/v1/datasets", files={"file": (filename, content())}, data=fields)


@functools.cache
def four_gigabytes_of_zeros() -> bytes:
    return zeros_npz((1000, 10**6))  # 3.9 MB


CASES = {
    "grad_clip Infinity": Case(spec('{"optim": {"grad_clip": Infinity}}'), 422, "invalid_spec", "optim.grad_clip"),
    "min_lr Infinity": Case(spec('{"optim": {"schedule": {"name": "plateau", "min_lr": Infinity}}}'), 422,
                            "invalid_spec", "optim.schedule.min_lr"),
    "baseline NaN": Case(spec('{"train": {"early_stopping": {"baseline": NaN}}}'), 422, "invalid_spec",
                         "train.early_stopping.baseline"),
    "min_delta -Infinity": Case(spec('{"train": {"early_stopping": {"min_delta": -Infinity}}}'), 422, "invalid_spec",
                                "train.early_stopping.min_delta"),
    "NUL in name": Case(spec('{"name": "a\\u0000b"}'), 422, "invalid_spec", "name"),
    "NUL in a query": Case(lambda c: c.get("/v1/jobs", params={"name": "\x00"}), 422, "invalid_request",
                           "query.name"),
    "NUL in an upload's name": Case(upload("a.csv", lambda: b"f,label\n1,0\n2,1\n", name="\x00"), 422,
                                    "invalid_request", "name"),
    "seed 2**70": Case(spec(f'{{"train": {{"seed": {2**70}}}}}'), 422, "invalid_spec", "train.seed"),
    "csv field of 200 KiB": Case(upload("big.csv", lambda: f"f1,label\n{'1' * 200 * 1024},1\n1,0\n".encode()), 422,
                                 "invalid_dataset", "file"),
    "npz header declaring (10**12,)": Case(upload("lies.npz", lambda: npz_declaring((10**12,))), 422,
                                           "invalid_dataset", "file"),
    "npz of 1.2 GiB float64 in 0.8 MB": Case(upload("f8.npz", lambda: zeros_npz((100, 10**6), "<f8")), 413,
                                             "dataset_too_large", "file"),
    "npz of 4 GB in 3.9 MB": Case(upload("bomb.npz", four_gigabytes_of_zeros), 413, "dataset_too_large", "file"),
    "four 8000x8000 PNGs in 1 KB": Case(upload("bomb.zip", png_bomb_zip), 413, "dataset_too_large", "file"),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_each_hostile_input_gets_its_4xx_and_the_api_lives_on(api: CappedApi, name: str):
    case = CASES[name]
    with api.client() as client:
        r = case.send(client)
    assert r.status_code == case.status, r.text
    error = r.json()["error"]
    assert error["code"] == case.code and case.path in [d["path"] for d in error["details"]], error
    assert api.proc is not None and api.proc.poll() is None, api.log()
    assert httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200


def test_after_them_all_the_api_still_takes_real_work(api: CappedApi):
    with api.client() as client:
        dataset = client.post("/v1/datasets", files={"file": ("ok.npz", npz_bytes())})
        assert dataset.status_code == 201, dataset.text
        job = client.post("/v1/jobs", json=make_spec(data={"dataset": dataset.json()["id"]}))
        assert job.status_code == 201, job.text
    assert "internal error" not in api.log()
