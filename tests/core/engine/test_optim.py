"""Optimizers are the ones named, and schedules move the learning rate as documented."""

import math

import pytest
import torch

from core.engine.optim import Schedule, build_optimizer
from core.spec import OptimSpec, ScheduleSpec


def make_opt(name="adam", lr=0.1, **kw):
    params = [torch.nn.Parameter(torch.ones(3))]
    return build_optimizer([{"params": params, "lr": lr}], OptimSpec(name=name, lr=lr, **kw))


@pytest.mark.parametrize(
    "name,cls,check",
    [
        ("sgd", torch.optim.SGD, lambda g: g["momentum"] == 0 and not g["nesterov"]),
        ("momentum", torch.optim.SGD, lambda g: g["momentum"] == 0.9 and not g["nesterov"]),
        ("nesterov", torch.optim.SGD, lambda g: g["momentum"] == 0.9 and g["nesterov"]),
        ("adagrad", torch.optim.Adagrad, lambda g: True),
        ("rmsprop", torch.optim.RMSprop, lambda g: g["alpha"] == 0.99),
        ("adam", torch.optim.Adam, lambda g: g["betas"] == (0.9, 0.999)),
        ("adamw", torch.optim.AdamW, lambda g: g["weight_decay"] == 0.01),
    ],
)
def test_named_optimizers(name, cls, check):
    opt = make_opt(name, weight_decay=0.01 if name == "adamw" else 0.0)
    assert type(opt) is cls and check(opt.param_groups[0])


def test_momentum_accelerates_over_plain_sgd():
    # on a constant gradient, momentum's steps grow while plain SGD's stay the same size
    def distance(name):
        opt = make_opt(name, lr=0.1)
        p = opt.param_groups[0]["params"][0]
        for _ in range(10):
            opt.zero_grad()
            p.sum().backward()
            opt.step()
        return (1 - p.detach()[0]).item()

    assert distance("momentum") > 2 * distance("sgd")


def lrs(schedule_kw, steps_per_epoch=10, epochs=10, lr=1.0):
    opt = make_opt("sgd", lr=lr)
    sched = Schedule(ScheduleSpec(**schedule_kw), opt, steps_per_epoch, epochs)
    out = []
    for step in range(steps_per_epoch * epochs):
        sched.apply(step)
        out.append(sched.lr())
    return out


def test_constant():
    assert set(lrs({"name": "constant"})) == {1.0}


def test_warmup_rises_linearly_then_holds():
    out = lrs({"name": "constant", "warmup_epochs": 2})
    assert out[0] == pytest.approx(0.01) and out[10] == pytest.approx(0.505) and out[20:] == [1.0] * 80
    assert all(a < b for a, b in zip(out[:20], out[1:21], strict=True))


def test_step_decays_every_step_size_epochs():
    out = lrs({"name": "step", "step_size": 3, "gamma": 0.5})
    assert out[29] == 1.0 and out[30] == 0.5 and out[60] == 0.25


def test_cosine_ends_at_min_lr():
    out = lrs({"name": "cosine", "min_lr": 0.1})
    assert out[0] == 1.0 and out[50] == pytest.approx(0.55, abs=0.01) and out[-1] == pytest.approx(0.1, abs=0.01)


def test_onecycle_rises_then_falls_far_below_start():
    out = lrs({"name": "onecycle"})
    peak = out.index(max(out))
    assert out[0] == pytest.approx(1 / 25) and 25 <= peak <= 35 and max(out) == pytest.approx(1.0, abs=1e-3)
    assert out[-1] < out[0] / 100


def test_plateau_uses_keras_rule():
    opt = make_opt("sgd", lr=1.0)
    sched = Schedule(ScheduleSpec(name="plateau", patience=2, factor=0.5), opt, 1, 10)
    seen = []
    for v in [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]:
        sched.epoch_end({"val/loss": v})
        sched.apply(0)
        seen.append(sched.lr())
    # reduces on the patience-th bad epoch (Keras `>=`), not the (patience+1)-th (PyTorch `>`)
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]


def test_schedule_scales_every_group_from_its_own_base():
    params = [torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))]
    opt = build_optimizer([{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1}],
                          OptimSpec(name="adam", lr=0.1))
    sched = Schedule(ScheduleSpec(name="cosine"), opt, 10, 1)
    sched.apply(5)
    ratio = opt.param_groups[0]["lr"] / opt.param_groups[1]["lr"]
    assert math.isclose(ratio, 0.1) and opt.param_groups[1]["lr"] < 0.1
