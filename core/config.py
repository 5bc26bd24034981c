"""Service settings, read from TRICKSERVE_* environment variables into one Settings object.

Each entry point (the command line, the worker's Celery app, the Alembic environment) builds Settings once and
passes it down; nothing below an entry point reads the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url


class Settings(BaseSettings):
    """Everything the API and the worker are configured by; paths left unset are placed under `home`."""

    model_config = SettingsConfigDict(env_prefix="TRICKSERVE_", extra="ignore")

    home: Path = Field(default=Path(".trickserve"), description="folder of the embedded database, broker and files")
    # Defaults derived from `home` (pydantic passes the fields validated so far to these factories).
    database_url: str = Field(
        default_factory=lambda f: f"sqlite:///{f['home'] / 'trickserve.db'}",
        description="SQLAlchemy URL (sqlite:///path or postgresql+psycopg://...); default {home}/trickserve.db",
    )
    broker_url: str = Field(
        default="filesystem://", description="Celery broker; default the filesystem broker under home"
    )
    broker_dir: Path = Field(
        default_factory=lambda f: f["home"] / "broker", description="filesystem broker folder; default {home}/broker"
    )
    redis_url: str | None = Field(default=None, description="Redis for live notifications; polling only when unset")
    artifact_dir: Path = Field(
        default_factory=lambda f: f["home"] / "artifacts",
        description="checkpoints and models of the default store, and each worker's attempt folders; default "
        "{home}/artifacts",
    )
    dataset_dir: Path = Field(
        default_factory=lambda f: f["home"] / "datasets",
        description="uploaded datasets of the default store, and the API's spool of uploads being received; default "
        "{home}/datasets",
    )
    storage_url: str | None = Field(
        default=None,
        description="where datasets, checkpoints and models live: a folder (a path or file:///path; a shared "
        "filesystem such as NFS when workers run on other machines) holding datasets/ and artifacts/, or "
        "s3://bucket/prefix for any S3-compatible store (credentials from the usual AWS_* variables); default "
        "dataset_dir and artifact_dir",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="the S3 endpoint of a store other than AWS (MinIO, Ceph, R2): http(s)://host:port"
    )
    storage_presign_s: int = Field(
        default=0,
        ge=0,
        le=7 * 24 * 3600,
        description="S3: model downloads redirect (307) to a presigned URL valid this long (s), so the bytes do not "
        "pass through the API; the URL names the endpoint the API uses, so clients must reach it too; 0 streams "
        "through the API",
    )
    storage_retry_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="how long a storage outage is retried, with backoff, before an upload answers 503, a checkpoint "
        "is skipped (with a warning; the job keeps its last one) or the attempt fails as `storage` (s)",
    )
    dataset_cache_mb: int = Field(
        default=4096,
        ge=0,
        description="S3: datasets a worker keeps on its own disk (in cache_dir), keyed by content hash, the least "
        "recently used evicted past this size (MiB)",
    )
    cache_dir: Path = Field(
        default_factory=lambda f: f["home"] / "cache",
        description="built-in datasets, made once and kept as arrays for every later job; default {home}/cache",
    )

    lease_s: float = Field(default=30.0, gt=0, le=3600, description="a running job's lease, renewed by heartbeat (s)")
    heartbeat_s: float = Field(default=5.0, gt=0, le=600, description="interval between worker heartbeats (s)")
    reaper_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="interval between expired-lease sweeps (s)"
    )
    redispatch_after_s: float = Field(
        default=600.0,
        gt=0,
        description="a queued job not claimed this long after dispatch is sent to the broker again (s)",
    )
    broker_visibility_timeout_s: float = Field(
        default=24 * 3600.0,
        ge=1,
        description="Redis broker: an unacknowledged message is delivered again after this long (s); a running job's "
        "redelivered message is dropped by the claim, so a long one only costs a wasted delivery",
    )
    sqlite_busy_timeout_s: float = Field(default=30.0, gt=0, le=600, description="how long a SQLite writer waits (s)")
    db_pool_size: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="database connections each process keeps open; with PostgreSQL, keep API processes x "
        "(db_pool_size + db_pool_overflow + sse_db_pool_size), plus a few per worker, under its max_connections",
    )
    db_pool_overflow: int = Field(
        default=10, ge=0, le=1000, description="connections a process may open beyond db_pool_size under load"
    )
    db_pool_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description="how long a request waits for a free database connection before it is answered 503 with "
        "Retry-After (s)",
    )
    sse_db_pool_size: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="database connections of the event streams of an API process, apart from the requests' pool so "
        "that polling and streaming cannot starve each other",
    )

    max_upload_mb: int = Field(default=200, ge=1, le=100_000, description="largest dataset upload (MiB)")
    max_body_kb: int = Field(default=1024, ge=1, le=100_000, description="largest JSON request body (KiB)")
    default_page_size: int = Field(default=50, ge=1, description="items per page when the client asks for none")
    max_page_size: int = Field(default=1000, ge=1, le=100_000, description="most items one page may hold")
    max_active_jobs_per_tenant: int = Field(
        default=100,
        ge=1,
        description="queued + running jobs a tenant may have; a study's trials count, and a study waits for room",
    )
    max_study_trials: int = Field(default=500, ge=1, le=100_000, description="most trials (points x seeds) of a study")
    request_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest wait for the next part of a request body; a body that stops arriving is answered 408 "
        "and its upload's temporary file removed (s)",
    )
    upload_temp_max_age_s: float = Field(
        default=3600.0,
        gt=0,
        description="a dataset upload's temporary file untouched this long was left by an API that stopped "
        "mid-upload, and is deleted; swept at start-up and every quarter of this (s)",
    )
    sse_max_connections_per_tenant: int = Field(
        default=10,
        ge=1,
        description="open event streams per tenant; counted across API processes and machines through Redis when "
        "redis_url is set, per API process otherwise",
    )
    sse_max_connections: int = Field(
        default=4096,
        ge=1,
        description="open event streams per API process, all tenants together; beyond it a stream is answered 503 "
        "with Retry-After (each stream holds a socket, so keep it under the process's open-file limit)",
    )
    sse_viewer_queue: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="how far an event stream may fall behind the live feed, in the feed's reads (each carries the "
        "events committed since the one before); a viewer further behind is disconnected, its client resumes with "
        "Last-Event-ID, and it never holds up the others",
    )
    write_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a client that takes none of what the API sends it for this long is disconnected (s): an event "
        "stream that is never read gives its slot back once the client's receive buffer is full and this has passed",
    )
    sse_ping_s: float = Field(
        default=15.0, gt=0, le=300, description="keep-alive comment interval of event streams (s)"
    )
    retry_after_s: int = Field(
        default=30, ge=1, le=3600, description="Retry-After of a 429 for too many active jobs or open streams (s)"
    )
    max_epochs: int = Field(default=1000, ge=1, le=10000, description="largest train.epochs a job may ask for")
    max_runtime_s: float = Field(
        default=24 * 3600, gt=0, le=7 * 24 * 3600, description="largest resources.max_runtime_s a job may ask for (s)"
    )
    max_dataset_examples: int = Field(
        default=1_000_000, ge=1, description="most examples an uploaded or synthetic dataset may hold (count)"
    )
    max_dataset_memory_mb: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="most memory reading one uploaded dataset may take, decoded (MiB); checked against what the file "
        "declares (array shapes, image sizes, rows) before decoding it",
    )
    max_dataset_storage_mb: int = Field(
        default=10_240, ge=1, description="total size of the uploaded datasets a tenant may keep (MiB)"
    )
    max_job_memory_mb: int = Field(
        default=4096,
        ge=1,
        description="largest memory a job may be estimated to need (data, model, optimizer state, activations of "
        "one batch) (MiB); keep it below a worker's memory",
    )
    min_free_disk_mb: int = Field(
        default=100,
        ge=0,
        description="free space the home, artifact and dataset folders must keep: below it new jobs and uploads "
        "are refused with 507 and /readyz answers 503 (MiB); 0 turns the check off",
    )
    metrics_token: str | None = Field(
        default=None,
        min_length=16,
        description="bearer token for GET /metrics (it shows every tenant's running jobs); when unset, /metrics "
        "answers only clients on this machine (loopback), so set it when Prometheus scrapes from elsewhere",
    )

    @field_validator("home")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        # Resolved once so that a worker and an API started from different folders share the same files.
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> Settings:
        if self.heartbeat_s * 2 > self.lease_s:
            raise ValueError("heartbeat_s must be at most half of lease_s, or a slow beat loses the lease")
        return self

    @model_validator(mode="after")
    def _live_uploads_are_never_stale(self) -> Settings:
        # An upload in progress writes to its file at least every request_body_timeout_s, or is cut off.
        if self.upload_temp_max_age_s <= self.request_body_timeout_s:
            raise ValueError(
                "upload_temp_max_age_s must be longer than request_body_timeout_s, or the sweep "
                "deletes uploads still arriving"
            )
        return self

    @property
    def broker_transport_options(self) -> dict[str, Any]:
        """Celery `broker_transport_options`: the folders of the filesystem broker, empty for other brokers."""
        if not self.broker_url.startswith("filesystem://"):
            return {}
        queue = str(self.broker_dir / "queue")
        return {
            "data_folder_in": queue,
            "data_folder_out": queue,
            "processed_folder": str(self.broker_dir / "processed"),
        }

    def storage_folders(self) -> list[Path]:
        """The folders the service writes files to: home, artifacts, datasets and the SQLite database's folder."""
        folders = [self.home, self.artifact_dir, self.dataset_dir]
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            folders.append(Path(url.database).parent)
        return folders

    def ensure_dirs(self) -> None:
        """Create the folders the service writes to (the filesystem broker needs its folders to exist)."""
        folders = [self.home, self.artifact_dir, self.dataset_dir]
        folders += [Path(p) for p in self.broker_transport_options.values()]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
