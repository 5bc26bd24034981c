"""The training loop: setup, epochs of index-sliced batches on the device, evaluation, checkpoints, teardown."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from core.engine import checkpoint as ckpt
from core.engine.augment import Augmenter
from core.engine.callbacks import Callback, CallbackList, RunContext, TimeLimit
from core.engine.data import DataBundle, load_data
from core.engine.events import EventKind
from core.engine.init import distinct_units, initialize
from core.engine.models import Net, build_model
from core.engine.optim import Schedule, build_optimizer
from core.engine.stopping import EarlyStopping
from core.engine.transfer import frozen_block_count, load_pretrained, param_groups
from core.spec import JobSpec

STATUS_BY_REASON = {
    None: "succeeded",
    "early_stop": "early_stopped",
    "cancelled": "cancelled",
    "pruned": "pruned",  # a study's pruner asked the run to stop (the service's StopFlag)
    "timeout": "failed",
    "diverged": "failed",
}


@dataclass
class RunResult:
    """What a run ended with; `metrics` are the final values, test metrics included."""

    status: str  # succeeded | early_stopped | cancelled | pruned | failed
    stop_reason: str | None  # early_stop | cancelled | pruned | timeout | diverged
    epochs_run: int
    best_epoch: int | None
    metrics: dict[str, float | None]
    history: list[dict[str, float]]
    checkpoint_path: str | None = None
    model_path: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    model: torch.nn.Module | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        keys = ("status", "stop_reason", "epochs_run", "best_epoch", "metrics", "history", "info")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Run:
    """Everything the loop touches, built once by `_setup`."""

    spec: JobSpec
    device: torch.device
    data: DataBundle
    model: Net
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    augment: Augmenter
    generator: torch.Generator
    callbacks: CallbackList
    ctx: RunContext
    autocast: Any
    out_dir: Path | None
    info: dict[str, Any]
    train_sums: torch.Tensor | None = None


def resolve_device(name: str | torch.device | None) -> torch.device:
    """`auto` means CUDA when present, else the CPU."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def train(
    spec: JobSpec,
    callbacks: list[Callback] | tuple[Callback, ...] = (),
    device: str | torch.device | None = None,
    resume_from: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    data_path: str | None = None,
    transfer_from: str | None = None,
    cache_dir: str | Path | None = None,
) -> RunResult:
    """Train a model as the spec says; checkpoints and the model file go to `out_dir` when given, and built-in
    datasets are kept in `cache_dir` once made."""
    run = _setup(spec, callbacks, device, out_dir, data_path, transfer_from, cache_dir)
    ctx, cbs = run.ctx, run.callbacks
    cbs.on_train_begin(ctx)
    progress = _resume(run, resume_from) if resume_from else None
    every = spec.train.checkpoint_every
    while ctx.epoch < spec.train.epochs and not ctx.should_stop:
        t0 = time.perf_counter()
        progress = _train_epoch(run, progress)
        if progress is not None:  # stopped mid-epoch: keep the partial epoch so a resume continues it
            _checkpoint(run, progress)
            break
        logs = _epoch_logs(run, t0)
        ctx.history.append(logs)
        ctx.epoch += 1
        # The epoch's metrics (with the state callbacks reach from them) first, then what callbacks decide.
        ctx.emit(EventKind.epoch_end, {**logs, **cbs.epoch_report(ctx, logs)})
        cbs.on_epoch_end(ctx, logs)
        run.schedule.epoch_end(logs)
        last = ctx.epoch == spec.train.epochs or ctx.should_stop
        if run.out_dir and ((every and ctx.epoch % every == 0) or last):
            _checkpoint(run, None)
    return _finish(run)


def _setup(spec, callbacks, device, out_dir, data_path, transfer_from, cache_dir) -> Run:
    dev = resolve_device(device if device is not None else spec.resources.device)
    torch.manual_seed(spec.train.seed)  # initialization and dropout draw from the global generator
    data = load_data(spec.data, dev, path=data_path, cache_dir=Path(cache_dir) if cache_dir else None)
    model = build_model(spec.model, data.input_shape, data.n_classes)
    info: dict[str, Any] = {"init": initialize(model, spec.model), "device": str(dev)}
    if spec.transfer is not None:
        source = transfer_from or _weights_path(spec.transfer.from_path)
        info["transfer"] = load_pretrained(model, source)
        model.freeze_blocks(frozen_block_count(model, spec.transfer))
        info["transfer"]["frozen_blocks"] = model.frozen
    model.to(dev)
    cuda = dev.type == "cuda"
    if cuda and model.conv2d:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    groups = param_groups(model, spec.optim.lr, spec.transfer)
    optimizer = build_optimizer(groups, spec.optim)
    n = data.x_train.shape[0]
    bs = min(spec.train.batch_size, n)
    steps = n // bs if n % bs == 1 else math.ceil(n / bs)  # a lone last example would break batch norm
    schedule = Schedule(spec.optim.schedule, optimizer, steps, spec.train.epochs)
    generator = torch.Generator(device=dev).manual_seed(spec.train.seed)
    builtin: list[Callback] = [TimeLimit(spec.resources.max_runtime_s)]
    if spec.train.early_stopping is not None:
        builtin.insert(0, EarlyStopping(spec.train.early_stopping))
    cbs = CallbackList([*builtin, *callbacks])
    fwd = model if not (spec.resources.compile and cuda) else cast(torch.nn.Module, torch.compile(model))
    ctx = RunContext(model=fwd, epochs=spec.train.epochs, steps_per_epoch=steps, sink=cbs)
    bf16 = cuda and spec.resources.precision != "fp32"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    info.update(
        n_params=sum(p.numel() for p in model.parameters()),
        n_train=n,
        batch_size=bs,
        steps_per_epoch=steps,
        precision="bf16" if bf16 else "fp32",
    )
    augment = Augmenter(spec.data.augment, data.kind, data.shift, data.scale)
    return Run(
        spec,
        dev,
        data,
        model,
        optimizer,
        schedule,
        augment,
        generator,
        cbs,
        ctx,
        autocast,
        Path(out_dir) if out_dir else None,
        info,
    )


def _train_epoch(run: Run, progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """One pass over the training split; returns the partial-epoch state if a stop interrupted it."""
    ctx, data, model, opt = run.ctx, run.data, run.model, run.optimizer
    bs, steps, clip = run.info["batch_size"], ctx.steps_per_epoch, run.spec.optim.grad_clip
    smoothing = run.spec.train.label_smoothing
    if progress is None:
        perm = torch.randperm(data.x_train.shape[0], device=run.device, generator=run.generator)
        sums, start = torch.zeros(3, device=run.device), 0  # loss*n, correct, n; summed on the device
    else:
        perm, sums, start = progress["perm"].to(run.device), progress["sums"].to(run.device), progress["batch"]
    ctx.model.train()
    interval, last_report, t_epoch = run.spec.train.progress_interval_s, time.monotonic(), time.monotonic()
    for i in range(start, steps):
        idx = perm[i * bs : (i + 1) * bs]
        x, y = data.x_train[idx], data.y_train[idx]
        if run.augment.enabled:
            x = run.augment(x, run.generator)
        with run.autocast():
            logits = ctx.model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        ctx.step += 1
        run.schedule.apply(ctx.step)
        with torch.no_grad():  # no .item() here: a host sync per step would stall a GPU
            sums[0].add_(loss.detach(), alpha=y.shape[0])
            sums[1].add_((logits.argmax(1) == y).sum())
            sums[2].add_(y.shape[0])
        run.callbacks.on_step_end(ctx)
        if time.monotonic() - last_report >= interval:
            last_report = time.monotonic()
            _report_progress(run, sums, i + 1 - start, last_report - t_epoch, i + 1)
        if ctx.should_stop and i + 1 < steps:
            return {"perm": perm.cpu(), "sums": sums.cpu(), "batch": i + 1}
    run.train_sums = sums
    return None


def _report_progress(run: Run, sums: torch.Tensor, steps_done: int, elapsed: float, step_in_epoch: int) -> None:
    loss_sum, _, n = sums.tolist()
    running = loss_sum / max(n, 1)
    if not math.isfinite(running):
        _diverged(run)
    data = {
        "step_in_epoch": step_in_epoch,
        "steps_per_epoch": run.ctx.steps_per_epoch,
        "samples_per_s": steps_done * run.info["batch_size"] / max(elapsed, 1e-9),
        "train/loss": _clean(running),
        "lr": run.schedule.lr(),
    }
    run.ctx.emit(EventKind.progress, data, epoch=run.ctx.epoch + 1)


def _diverged(run: Run) -> None:
    """A non-finite training loss ends the run as failed/diverged (checked where values reach the host)."""
    if run.ctx.stop_reason != "diverged":
        run.ctx.stop("diverged")
        run.ctx.emit(EventKind.diverged, {"message": "training loss is not finite"}, epoch=run.ctx.epoch + 1)


def _epoch_logs(run: Run, t0: float) -> dict[str, Any]:
    assert run.train_sums is not None
    loss_sum, correct, n = run.train_sums.tolist()
    logs = {"epoch": run.ctx.epoch + 1, "train/loss": loss_sum / n, "train/acc": correct / n}
    if not math.isfinite(logs["train/loss"]):
        _diverged(run)
    if run.data.x_val.shape[0]:
        logs["val/loss"], logs["val/acc"] = evaluate(run, run.data.x_val, run.data.y_val)
    logs["lr"] = run.schedule.lr()
    logs["epoch_time_s"] = time.perf_counter() - t0
    return {k: _clean(v) for k, v in logs.items()}


def evaluate(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy over a split, in eval mode, without autograd."""
    model, bs = run.ctx.model, run.spec.train.eval_batch_size
    model.eval()
    sums = torch.zeros(2, device=run.device)
    with torch.inference_mode(), run.autocast():
        for i in range(0, x.shape[0], bs):
            logits = model(x[i : i + bs]).float()
            sums += torch.stack(
                (F.cross_entropy(logits, y[i : i + bs], reduction="sum"), (logits.argmax(1) == y[i : i + bs]).sum())
            )
    loss_sum, correct = sums.tolist()
    return loss_sum / x.shape[0], correct / x.shape[0]


def _checkpoint(run: Run, progress: dict[str, Any] | None) -> None:
    if run.out_dir is None:
        return
    ctx = run.ctx
    state = {
        "spec": run.spec.model_dump_json(),
        "epoch": ctx.epoch,
        "step": ctx.step,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "schedule": run.schedule.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "generator": run.generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else [],
        },
        "callbacks": run.callbacks.state_dict(),
        "history": ctx.history,
        "epoch_progress": progress,
    }
    path = ckpt.save_checkpoint(run.out_dir / ckpt.CHECKPOINT_NAME, state)
    run.callbacks.on_checkpoint(ctx, path)
    data = {"path": path, "epoch": ctx.epoch, "step": ctx.step, "partial": progress is not None}
    ctx.emit(EventKind.checkpoint, data)
    run.info["checkpoint_path"] = path


def _resume(run: Run, path: str | Path) -> dict[str, Any] | None:
    """Restore a checkpoint's full state; returns the partial-epoch state if it was taken mid-epoch."""
    state = ckpt.load_checkpoint(path)
    ctx = run.ctx
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.callbacks.load_state_dict(state["callbacks"])
    torch.set_rng_state(state["rng"]["torch"])
    run.generator.set_state(state["rng"]["generator"].to(run.generator.get_state().device))
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    ctx.epoch, ctx.step, ctx.history = state["epoch"], state["step"], list(state["history"])
    run.schedule.apply(ctx.step)
    ctx.emit(EventKind.resumed, {"from_step": ctx.step, "from_epoch": ctx.epoch})
    return state["epoch_progress"]


def _finish(run: Run) -> RunResult:
    ctx, spec = run.ctx, run.spec
    run.callbacks.on_train_end(ctx)  # early stopping restores the best weights here
    metrics: dict[str, float | None] = dict(ctx.history[-1]) if ctx.history else {}
    if ctx.stop_reason != "diverged" and run.data.x_test.shape[0]:
        test_loss, test_acc = evaluate(run, run.data.x_test, run.data.y_test)
        metrics.update({"test/loss": _clean(test_loss), "test/acc": _clean(test_acc)})
        # How many of the first layer's units are still different from each other (zero init: one).
        metrics["model/distinct_units"] = distinct_units(run.model)
        final = {k: metrics[k] for k in ("test/loss", "test/acc", "model/distinct_units")}
        ctx.emit(EventKind.test, final)
    model_path = None
    if run.out_dir is not None:
        model_path = ckpt.save_model(run.model, run.out_dir / ckpt.MODEL_NAME, spec.model_dump_json())
    es = next((c for c in run.callbacks.callbacks if isinstance(c, EarlyStopping)), None)
    best_epoch = es.best_epoch + 1 if es is not None and es.best is not None else None
    return RunResult(
        status=STATUS_BY_REASON[ctx.stop_reason],
        stop_reason=ctx.stop_reason,
        epochs_run=ctx.epoch,
        best_epoch=best_epoch,
        metrics=metrics,
        history=ctx.history,
        checkpoint_path=run.info.get("checkpoint_path"),
        model_path=model_path,
        info=run.info,
        model=run.model,
    )


def _weights_path(path: str | None) -> str:
    p = Path(path or "")
    return str(p / ckpt.MODEL_NAME) if p.is_dir() else str(p)


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None
