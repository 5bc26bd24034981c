"""Authentication: every route but health and readiness takes a live API key; /metrics takes its own token or
loopback; the embedded key file; the `trickserve keys` admin commands."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from cli import main as cli
from cli.keys import KEY_FILE, ensure_embedded_key
from core import tenants
from core.config import Settings
from tests.factories import make_spec, new_key

OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}
METRICS_TOKEN = "metrics-token-for-tests"


def protected_operations(client: TestClient) -> list[tuple[str, str]]:
    """(method, url) of every operation in the OpenAPI document that needs a key, ids filled with dummies."""
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path.format(job_id="job_x", dataset_id="ds_x", study_id="stu_x"))
        for path, operations in paths.items()
        if path not in OPEN_PATHS
        for method in operations
    ]


def assert_unauthorized(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")


@pytest.fixture
def anonymous(client: TestClient) -> TestClient:
    return TestClient(client.app)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer tsk_not-a-key", "Basic dXNlcjpwYXNz", "tsk_without-scheme", "Bearer " + "x" * 5000],
)
def test_every_operation_refuses_a_missing_or_unknown_key(anonymous: TestClient, authorization: str | None):
    headers = {} if authorization is None else {"Authorization": authorization}
    operations = protected_operations(anonymous)
    assert len(operations) >= 13  # the document lists them all; a new route is covered without editing this test
    for method, url in operations:
        assert_unauthorized(anonymous.request(method, url, headers=headers))


def test_the_401_comes_before_any_body_or_content_type_check(anonymous: TestClient):
    assert_unauthorized(anonymous.post("/v1/jobs", json=make_spec()))
    assert_unauthorized(anonymous.post("/v1/jobs", content=b"name=x", headers={"content-type": "text/plain"}))
    assert_unauthorized(anonymous.post("/v1/datasets", files={"file": ("a.npz", b"x")}))


def test_health_and_readiness_need_no_key(anonymous: TestClient):
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/readyz").status_code == 200


def test_a_revoked_key_is_refused_and_others_keep_working(client: TestClient):
    sessions = client.app.state.sessions
    key, other = new_key(sessions, "acme"), new_key(sessions, "acme")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with sessions() as s:
        assert tenants.revoke_api_key(session=s, key_or_prefix=key)
        assert not tenants.revoke_api_key(session=s, key_or_prefix=key)  # already revoked
    assert_unauthorized(client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}))
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {other}"}).status_code == 200


def test_keys_are_stored_as_hashes_only(client: TestClient):
    sessions = client.app.state.sessions
    key = new_key(sessions, "acme")
    with sessions() as s:
        rows = tenants.list_api_keys(s, "acme")
        assert [(r.key_hash, r.prefix) for r in rows] == [(tenants.hash_key(key), key[:12])]
        assert tenants.authenticate(s, key) == "acme"
        assert tenants.authenticate(s, key[:-1]) is None and tenants.authenticate(s, rows[0].key_hash) is None
    assert key.startswith("tsk_") and len(key) >= 40


def test_tenant_ids_must_be_safe_folder_names(client: TestClient):
    with client.app.state.sessions() as s:
        for bad in ("../etc", "", "a/b", "x" * 65, ".hidden"):
            with pytest.raises(tenants.InvalidTenantId):
                tenants.create_tenant(session=s, tenant_id=bad)


# ------------------------------------------------------------------------------------------ /metrics


def test_metrics_without_a_token_answer_loopback_clients_only(client: TestClient, make_server: Callable[..., Any]):
    r = client.get("/metrics")  # the test client's address is not a loopback one
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    served = make_server()
    assert httpx.get(f"{served.url}/metrics").status_code == 200  # 127.0.0.1


def test_metrics_with_a_token_take_that_token_and_nothing_else(make_client: Callable[..., TestClient]):
    client = make_client(metrics_token=METRICS_TOKEN)
    assert_unauthorized(client.get("/metrics"))  # the tenant's API key does not open it
    assert_unauthorized(client.get("/metrics", headers={"Authorization": "Bearer wrong-token-of-some-length"}))
    r = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert r.status_code == 200 and "trickserve_jobs" in r.text


# ------------------------------------------------------------------------------------------- embedded


def test_embedded_key_is_created_once_in_an_owner_only_file(settings: Settings):
    old_umask = os.umask(0)  # even a permissive umask must not make the file readable by others
    try:
        key, created = ensure_embedded_key(settings)
    finally:
        os.umask(old_umask)
    path = settings.home / KEY_FILE
    assert created and path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_embedded_key(settings) == (key, False)
    assert [p.name for p in settings.home.iterdir() if p.name.startswith(".api-key")] == []  # no temporary left


def test_embedded_key_is_replaced_when_revoked_and_tightened_when_loosened(settings: Settings, client: TestClient):
    key, _ = ensure_embedded_key(settings)
    path = settings.home / KEY_FILE
    path.chmod(0o644)
    assert ensure_embedded_key(settings) == (key, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with client.app.state.sessions() as s:
        tenants.revoke_api_key(session=s, key_or_prefix=key[:12])
    new, created = ensure_embedded_key(settings)
    assert created and new != key and path.read_text().strip() == new
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {new}"}).status_code == 200


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def admin(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Run `trickserve ...` in this process on the test's database; returns its standard output."""
    monkeypatch.setenv("TRICKSERVE_HOME", str(settings.home))
    monkeypatch.setenv("TRICKSERVE_DATABASE_URL", settings.database_url)

    def run(*argv: str, capsys: pytest.CaptureFixture[str]) -> str:
        capsys.readouterr()
        assert cli.main(list(argv)) == 0
        return capsys.readouterr().out

    return run


def test_keys_create_list_revoke(admin: Callable[..., str], client: TestClient, capsys: pytest.CaptureFixture[str]):
    out = admin("keys", "create", "--tenant", "acme", "--name", "ci", capsys=capsys)
    key = out.strip().splitlines()[-1]
    assert key.startswith("tsk_") and " " not in key
    assert client.get("/v1/quotas", headers={"Authorization": f"Bearer {key}"}).json()["tenant"] == "acme"
    listed = admin("keys", "list", "--tenant", "acme", capsys=capsys)
    assert key[:12] in listed and key not in listed and "ci" in listed and "live" in listed
    assert admin("keys", "revoke", key[:12], capsys=capsys).strip() == "revoked"
    assert_unauthorized(client.get("/v1/quotas", headers={"Authorization": f"Bearer {key}"}))
    assert "revoked" in admin("keys", "list", capsys=capsys)
    with pytest.raises(SystemExit):
        admin("keys", "revoke", key[:12], capsys=capsys)
    with pytest.raises(SystemExit):
        admin("keys", "create", "--tenant", "../x", capsys=capsys)
