"""The worker process's entry point, `celery -A worker.main worker`: the settings are read once, here."""

from core.config import Settings
from worker import oom, preload, reaper
from worker.celery_app import connect_worker_signals, create_app

app = create_app(Settings())
connect_worker_signals(app)
preload.before_forking()
reaper.run_in_worker(app)
oom.watch(app)
