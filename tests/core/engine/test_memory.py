"""The memory estimate of a job: each part grows with what drives it, and the total is in the ballpark of the peak
memory that training the job really takes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from core.engine.memory import DataSize, MemoryEstimate, driving_path, estimate_memory
from core.engine.models import build_model
from core.spec import JobSpec, builtin_info
from tests.factories import make_job_spec

REPO = Path(__file__).resolve().parents[3]
SIZE = DataSize(n_examples=1000, input_shape=(20,), n_classes=3)


def synthetic(n_samples: int = 1000, n_features: int = 20, **overrides: object) -> JobSpec:
    data = {"dataset": "builtin:synthetic", "synthetic": {"n_samples": n_samples, "n_features": n_features}}
    return make_job_spec(**{"data": data, **overrides})


def estimate_of(spec: JobSpec):
    info = builtin_info(spec.data)
    assert info is not None
    return estimate_memory(spec, DataSize(info.n_examples + info.n_test, info.input_shape, info.n_classes))


def test_data_is_every_example_as_float32_inputs_and_int64_labels():
    small, large = estimate_of(synthetic(1000, 50)), estimate_of(synthetic(4000, 50))
    assert small.data_bytes == 1000 * (50 * 4 + 8)
    assert large.data_bytes == 4 * small.data_bytes and large.loading_bytes == 4 * small.loading_bytes
    # Standardizing adds a float64 working copy of the training inputs to the raw arrays and their split copies.
    plain = estimate_of(synthetic(1000, 50, data={"normalize": "none"}))
    assert plain.loading_bytes < small.loading_bytes


@pytest.mark.parametrize(("optimizer", "copies"), [("sgd", 0), ("momentum", 2), ("rmsprop", 2), ("adam", 3)])
def test_optimizer_state_is_counted_in_copies_of_the_parameters(optimizer: str, copies: int):
    spec = make_job_spec(optim={"name": optimizer})
    estimate = estimate_memory(spec, SIZE)
    n_params = sum(p.numel() for p in build_model(spec.model, SIZE.input_shape, SIZE.n_classes).parameters())
    assert estimate.parameter_bytes == estimate.gradient_bytes == 4 * n_params
    assert estimate.optimizer_bytes == copies * estimate.parameter_bytes


def test_activations_grow_with_the_batch_and_the_layers():
    def activations(batch_size: int, layers: list[int]) -> MemoryEstimate:
        train = {"batch_size": batch_size, "eval_batch_size": 8}
        return estimate_memory(make_job_spec(train=train, model={"layers": layers}), SIZE)

    assert activations(64, [32]).activation_bytes == 2 * activations(32, [32]).activation_bytes
    assert activations(32, [32, 32]).activation_bytes > activations(32, [32]).activation_bytes
    assert activations(32, [32]).activation_path == "train.batch_size"


def test_the_largest_part_names_the_field_to_change():
    big = synthetic(150_000, 10_000)
    assert driving_path(big, estimate_of(big)) == "data.synthetic.n_samples"
    wide = make_job_spec(model={"layers": [4096, 4096]})
    assert driving_path(wide, estimate_memory(wide, SIZE)) == "model.layers"
    images = DataSize(1000, (3, 64, 64), 10)
    cnn = make_job_spec(model={"arch": "cnn", "layers": [64]}, train={"batch_size": 512, "eval_batch_size": 16})
    assert driving_path(cnn, estimate_memory(cnn, images)) == "train.batch_size"


def test_a_huge_model_is_estimated_without_being_allocated():
    estimate = estimate_memory(make_job_spec(model={"layers": [65536] * 8}), SIZE)
    assert estimate.parameter_bytes > 4 * 30_000_000_000
    assert estimate.total_bytes > 4 * estimate.parameter_bytes


MEASURE = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    from core.engine import train
    from core.spec import JobSpec
    import sklearn.datasets, mnist1d.data  # what the data loaders import, before the baseline
    torch.set_num_threads(1)
    specs = json.loads(sys.argv[1])
    train(JobSpec.model_validate(specs.pop(0)))  # the runtime's own first-use memory is not the job's
    for spec in specs:
        read, write = os.pipe()
        if os.fork() == 0:  # one child per job: the peak of each is its own
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            train(JobSpec.model_validate(spec))
            os.write(write, str((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024).encode())
            os._exit(0)
        os.close(write)
        print(os.read(read, 100).decode() or "failed")
        os.wait()
""")
CASES = {
    "data-bound": {"data": {"synthetic": {"n_samples": 12_000, "n_features": 500}}, "train": {"batch_size": 1024}},
    "activation-bound": {"data": {"synthetic": {"n_samples": 400, "shape": [3, 40, 40]}},
                         "model": {"arch": "cnn", "layers": [32]}, "train": {"batch_size": 200}},
}  # fmt: skip


def test_the_estimate_is_within_a_factor_of_three_of_the_measured_peak():
    specs = {name: synthetic(**{**case, "train": {"epochs": 1, **case["train"]}}) for name, case in CASES.items()}
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    warm_up = synthetic(100, train={"epochs": 1})
    dumped = json.dumps([spec.model_dump(mode="json") for spec in [warm_up, *specs.values()]])
    done = subprocess.run([sys.executable, "-c", MEASURE, dumped], capture_output=True, text=True, timeout=120,
                          env=env, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for (name, spec), measured in zip(specs.items(), done.stdout.split(), strict=True):
        estimated = estimate_of(spec).total_bytes
        assert estimated / 3 < int(measured) < estimated * 3, (name, int(measured) / 2**20, estimated / 2**20)
