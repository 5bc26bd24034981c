"""Many viewers of live event streams: are their streams complete and in order, how late do events reach them, and
what does the API hold in memory meanwhile.

For each checkout (--repo, repeatable; default this one) and mode (embedded: SQLite file, polling; pg: PostgreSQL
and Redis pub/sub) it starts a real API process (`trickserve api`) and, per scenario:
  - opens N viewers of one job's GET /v1/jobs/{id}/events at once (raw HTTP/1.1 over asyncio: a client light
    enough that 1,000 of them fit beside the server on two cores), or N viewers spread over 10 tenants' jobs;
  - once every viewer has its answer's headers, writes --events epoch_end events per job, --interval apart, as a
    worker would (core.jobs.record_events in a process of the checkout, which also publishes to Redis), then ends
    the job; each event carries the time it was committed;
  - a viewer is complete when it saw, in order, exactly the events a fresh stream of the finished job replays,
    then `end`. Event latency is the time from the commit to the viewer's read, over every viewer and event.
  - the API's resident memory is sampled throughout; the peak is reported.
Checkouts take turns within each scenario, so that both see the same load from the rest of the machine.

    python bench/viewers.py [--repo /path/to/old[:/its/venv/bin/python] --repo .] [--modes embedded,pg]
                            [--viewers 10,100,1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from common import free_port, postgres_database, wait_ready

HERE = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("TRICKSERVE_BENCH_REDIS", "redis://127.0.0.1:6379/14")
SPEC = {"name": "viewed", "data": {"dataset": "builtin:synthetic"}, "train": {"epochs": 1000}}
TENANTS = 10

# Runs in the checkout under test (its own core), as a worker would: claim each job, record events, end them.
FEEDER = """
import json, sys, time
from core import jobs
from core.config import Settings
from core.db import Database
from core.notify import publish
args = json.loads(sys.argv[1])
settings = Settings()
db = Database.from_settings(settings)
with db.session() as s:
    attempts = {j: jobs.claim_job(session=s, job_id=j, worker_id="bench", lease_s=3600).attempt for j in args["jobs"]}
print("claimed", flush=True)
sys.stdin.readline()  # go
for step in range(1, args["events"] + 1):
    for job_id, attempt in attempts.items():
        data = {"val/loss": 1.0 / step, "sent": time.time()}
        event = {"kind": "epoch_end", "step": step, "epoch": step, "data": data}
        with db.session() as s:
            jobs.record_events(session=s, job_id=job_id, attempt=attempt, events=[event])
        publish(settings.redis_url, job_id)
    time.sleep(args["interval"])
for job_id, attempt in attempts.items():
    with db.session() as s:
        jobs.finish_job(session=s, job_id=job_id, attempt=attempt, status="succeeded")
    publish(settings.redis_url, job_id)
"""


@dataclass
class Viewer:
    job_id: str
    key: str
    status: int = 0
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ended: bool = False
    error: str | None = None


@dataclass
class Checkout:
    """A checkout to measure, and the Python (virtual environment) to run it with."""

    repo: Path
    python: str = sys.executable

    @classmethod
    def parse(cls, value: str) -> Checkout:
        """PATH or PATH:PYTHON."""
        path, _, python = value.partition(":")
        return cls(Path(path).resolve(), python or sys.executable)

    @property
    def label(self) -> str:
        env = "" if self.python == sys.executable else f" ({Path(self.python).parents[1].name})"
        return f"{self.repo.name}{env}"


@dataclass
class Api:
    checkout: Checkout
    mode: str
    port: int
    pid: int
    env: dict[str, str]
    keys: list[str]  # one per tenant
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # scenario -> one dict per run


@contextmanager
def running_api(checkout: Checkout, mode: str) -> Iterator[Api]:
    """The checkout's API on a fresh home (and a fresh PostgreSQL database in pg mode), with TENANTS tenants."""
    home = Path(tempfile.mkdtemp(prefix="trickserve-viewers-"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRICKSERVE_HOME=str(home), TRICKSERVE_SSE_MAX_CONNECTIONS_PER_TENANT="5000")
    with _database(mode, env):
        repo, cli = checkout.repo, [checkout.python, "-m", "cli.main"]
        subprocess.run([*cli, "migrate"], cwd=repo, env=env, capture_output=True, check=True)
        keys = []
        for t in range(TENANTS):
            out = subprocess.run([*cli, "keys", "create", "--tenant", f"viewers{t}"], cwd=repo, env=env,
                                 capture_output=True, text=True, check=True)  # fmt: skip
            keys.append(out.stdout.strip().splitlines()[-1])
        port = free_port()
        log = open(home / "api.log", "w")  # noqa: SIM115 - closed with the process
        api = subprocess.Popen([*cli, "api", "--port", str(port)], cwd=repo, env=env, stdout=log, stderr=log)
        try:
            wait_ready(f"http://127.0.0.1:{port}")
            yield Api(checkout, mode, port, api.pid, env, keys)
        finally:
            api.terminate()
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
            log.close()


@contextmanager
def _database(mode: str, env: dict[str, str]) -> Iterator[None]:
    if mode == "embedded":
        yield
        return
    redis.Redis.from_url(REDIS_URL).flushdb()
    with postgres_database() as url:
        env.update(TRICKSERVE_DATABASE_URL=url, TRICKSERVE_REDIS_URL=REDIS_URL, TRICKSERVE_BROKER_URL=REDIS_URL)
        try:
            yield
        finally:
            redis.Redis.from_url(REDIS_URL).flushdb()


def scenario(api: Api, name: str, viewers: int, tenants: int, args: argparse.Namespace) -> None:
    """One run: `viewers` streams over `tenants` jobs (one per tenant), fed until the jobs end."""
    jobs = [_submit(api, api.keys[t]) for t in range(tenants)]
    crowd = [Viewer(jobs[i % tenants], api.keys[i % tenants]) for i in range(viewers)]
    feed = json.dumps({"jobs": jobs, "events": args.events, "interval": args.interval})
    feeder = subprocess.Popen(
        [api.checkout.python, "-c", FEEDER, feed],
        cwd=api.checkout.repo, env=api.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert feeder.stdout is not None and feeder.stdin is not None
    feeder.stdout.readline()  # claimed: the jobs are running
    peak = [_rss_mb(api.pid)]
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(api.pid, peak, stop))
    sampler.start()
    deadline = time.monotonic() + args.events * args.interval + 90

    async def watch() -> None:
        connected = asyncio.Event()
        pending = [viewers]

        def headers_in() -> None:
            pending[0] -= 1
            if pending[0] == 0:
                connected.set()

        tasks = [asyncio.create_task(_view(api.port, v, headers_in, deadline)) for v in crowd]
        try:
            await asyncio.wait_for(connected.wait(), 60)
        except TimeoutError:
            pass
        feeder.stdin.write("go\n")  # type: ignore[union-attr]
        feeder.stdin.flush()  # type: ignore[union-attr]
        await asyncio.gather(*tasks)

    asyncio.run(watch())
    feeder.wait(60)
    stop.set()
    sampler.join()
    reference = {job_id: _reference(api, job_id, api.keys[t]) for t, job_id in enumerate(jobs)}
    complete = sum(v.ended and v.ids == reference[v.job_id] for v in crowd)
    latencies = [x for v in crowd for x in v.latencies]
    errors = sum(v.status != 200 for v in crowd)
    api.results.setdefault(name, []).append({
        "complete": complete / viewers,
        "errors": errors,
        "p50_ms": 1000 * _quantile(latencies, 0.5),
        "p95_ms": 1000 * _quantile(latencies, 0.95),
        "rss_mb": max(peak),
    })  # fmt: skip


async def _view(port: int, viewer: Viewer, headers_in: object, deadline: float) -> None:
    """One viewer: GET the stream, read it to `end` (or the deadline), recording ids and latencies."""
    called = False

    def arrived() -> None:
        nonlocal called
        if not called:
            called = True
            headers_in()  # type: ignore[operator]

    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = (f"GET /v1/jobs/{viewer.job_id}/events HTTP/1.1\r\nHost: bench\r\n"
                   f"Authorization: Bearer {viewer.key}\r\nAccept: text/event-stream\r\n\r\n")  # fmt: skip
        writer.write(request.encode())
        status_line = await asyncio.wait_for(reader.readline(), max(deadline - time.monotonic(), 1))
        viewer.status = int(status_line.split()[1])
        chunked = False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            chunked |= line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
        arrived()
        if viewer.status != 200:
            writer.close()
            return
        buffer = b""
        while not viewer.ended:
            data = await asyncio.wait_for(_next_chunk(reader, chunked), max(deadline - time.monotonic(), 0.01))
            if not data:
                break
            buffer += data.replace(b"\r\n", b"\n")
            *frames, buffer = buffer.split(b"\n\n")
            now = time.time()
            for frame in frames:
                _frame(viewer, frame, now)
        writer.close()
    except (TimeoutError, OSError, ValueError, IndexError) as exc:
        viewer.error = type(exc).__name__
    finally:
        arrived()


async def _next_chunk(reader: asyncio.StreamReader, chunked: bool) -> bytes:
    if not chunked:
        return await reader.read(65536)
    size = int((await reader.readline()).strip() or b"0", 16)
    if size == 0:
        return b""
    data = await reader.readexactly(size + 2)
    return data[:-2]


def _frame(viewer: Viewer, frame: bytes, now: float) -> None:
    fields: dict[bytes, bytes] = {}
    for line in frame.split(b"\n"):
        name, _, value = line.partition(b":")
        if name:
            fields[name] = value.strip()
    if b"event" in fields and fields[b"event"] == b"end":
        viewer.ended = True
    elif b"id" in fields:
        viewer.ids.append(int(fields[b"id"]))
        if fields.get(b"event") == b"epoch_end":
            sent = json.loads(fields[b"data"])["data"].get("sent")
            if sent is not None:
                viewer.latencies.append(now - sent)


def _reference(api: Api, job_id: str, key: str) -> list[int]:
    """What a fresh stream of the finished job replays: the ids every viewer should have seen."""
    viewer = Viewer(job_id, key)
    asyncio.run(_view(api.port, viewer, lambda: None, time.monotonic() + 60))
    return viewer.ids


def _submit(api: Api, key: str) -> str:
    import httpx

    answer = httpx.post(f"http://127.0.0.1:{api.port}/v1/jobs", json=SPEC,
                        headers={"Authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    answer.raise_for_status()
    return str(answer.json()["id"])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _sample_rss(pid: int, peak: list[float], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        peak.append(_rss_mb(pid))


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--repo", action="append", type=Checkout.parse, help="PATH[:PYTHON], a checkout to measure (repeatable)"
    )
    parser.add_argument("--modes", default="embedded,pg")
    parser.add_argument("--viewers", default="10,100,1000", help="viewers of one job, per scenario")
    parser.add_argument("--tenant-viewers", type=int, default=100, help="viewers spread over 10 tenants' jobs")
    parser.add_argument("--events", type=int, default=40, help="epoch_end events per job")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between events")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the API inherits it: a socket per viewer
    scenarios = [(f"{n} viewers, 1 job", n, 1) for n in map(int, args.viewers.split(","))]
    if args.tenant_viewers:
        scenarios.append((f"{args.tenant_viewers} viewers, {TENANTS} tenants", args.tenant_viewers, TENANTS))
    print(f"{'mode':<9}{'checkout':<26}{'scenario':<24}{'complete':>9}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'RSS MB':>8}")  # fmt: skip
    for mode in args.modes.split(","):
        for name, n, tenants in scenarios:
            with ExitStack() as stack:
                checkouts = args.repo or [Checkout(HERE)]
                apis = [stack.enter_context(running_api(checkout, mode)) for checkout in checkouts]
                for _ in range(args.runs):
                    for api in apis:
                        scenario(api, name, n, tenants, args)
            for api in apis:
                runs = api.results[name]
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                print(f"{mode:<9}{api.checkout.label[-25:]:<26}{name:<24}{med['complete']:>9.0%}{med['errors']:>8.0f}"
                      f"{med['p50_ms']:>9.0f}{med['p95_ms']:>9.0f}{med['rss_mb']:>8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
