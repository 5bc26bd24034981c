"""The worker's main process imports what a job needs before it forks, without touching CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from worker import preload

REPO = Path(__file__).resolve().parents[2]
# In a fresh interpreter that has what a worker's main process has when it starts (worker.main, and worker.tasks
# which Celery imports): spy on torch.cuda, preload, then run a short job as a pool process would.
CODE = """
import json, sys, tempfile
import torch
touched = []
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device", "synchronize"):
    def spy(*args, _name=name, _real=getattr(torch.cuda, name), **kwargs):
        touched.append(_name)
        return _real(*args, **kwargs)
    setattr(torch.cuda, name, spy)
import worker.main, worker.tasks
from worker.preload import preload
failed = preload()
cuda = list(touched)
spec = json.loads(sys.argv[1])
before = set(sys.modules)
from core.engine import train
from core.spec import JobSpec
train(JobSpec.model_validate(spec), [], out_dir=tempfile.mkdtemp())
print(json.dumps({"failed": failed, "cuda": cuda, "cuda_initialized": torch.cuda.is_initialized(),
                  "imported_by_job": sorted(set(sys.modules) - before)}))
"""
# What took seconds in every job's process before: torch's compiler stack (torch.optim loads it), and the engine.
HEAVY = ("torch._dynamo", "torch._inductor", "torch.fx", "sympy", "core.engine", "safetensors")


def test_a_job_after_the_preload_imports_nothing_heavy_and_the_preload_never_touches_cuda():
    from tests.factories import make_spec

    spec = json.dumps(make_spec(model={"arch": "cnn", "layers": [8]}, data={"synthetic": {"n_features": 16}}))
    proc = subprocess.run([sys.executable, "-c", CODE, spec], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["failed"] == [] and found["cuda"] == [] and not found["cuda_initialized"]
    heavy = [m for m in found["imported_by_job"] if m.startswith(HEAVY)]
    assert heavy == [], f"a job still imports {len(heavy)} modules, {heavy[:5]}...: add them to preload.MODULES"


def test_a_module_that_cannot_be_imported_is_reported_and_the_rest_still_loads(monkeypatch, caplog):
    monkeypatch.setattr(preload, "MODULES", ("json", "no_such_module_anywhere", "csv"))
    assert preload.preload() == ["no_such_module_anywhere"]
    assert "could not preload no_such_module_anywhere" in caplog.text
