"""Advice: each good practice from the article fires when the spec departs from it, and only then."""

import pytest

from core.engine.advice import Advice, advise, estimate_train_size
from core.spec import JobSpec

AUGMENTED = {"dataset": "builtin:digits", "augment": {"rotate": {"degrees": 10}}}


def make_spec(**overrides) -> JobSpec:
    """A spec that follows every practice; overrides replace whole top-level sections."""
    return JobSpec.model_validate({"data": AUGMENTED, **overrides})


def codes(spec: JobSpec, n_train: int | None = None) -> list[str]:
    return [a.code for a in advise(spec, n_train)]


def only(code: str, spec: JobSpec, n_train: int | None = None) -> Advice:
    (advice,) = [a for a in advise(spec, n_train) if a.code == code]
    return advice


def test_a_spec_that_follows_every_practice_gets_no_advice():
    assert codes(make_spec()) == []
    assert codes(make_spec(model={"arch": "cnn", "layers": [8, 16], "dropout": 0.5})) == []


@pytest.mark.parametrize(("p", "fires"), [(0.0, False), (0.1, True), (0.2, False), (0.5, False), (0.6, True)])
def test_dropout_outside_twenty_to_fifty_percent(p, fires):
    assert ("DROPOUT_RANGE" in codes(make_spec(model={"dropout": p}))) == fires


def test_dropout_on_a_linear_model_does_nothing():
    assert only("DROPOUT_UNUSED", make_spec(model={"arch": "linear", "dropout": 0.3})).severity == "info"


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ({"init": "xavier_uniform", "activation": "relu"}, "XAVIER_WITH_RELU"),
        ({"init": "xavier_normal", "activation": "gelu"}, "XAVIER_WITH_RELU"),
        ({"init": "he_normal", "activation": "tanh"}, "HE_WITH_SATURATING"),
        ({"init": "he_uniform", "activation": "sigmoid"}, "HE_WITH_SATURATING"),
    ],
)
def test_init_that_does_not_suit_the_activation(model, code):
    advice = only(code, make_spec(model=model))
    assert advice.path == "model.init" and advice.severity == "warning"


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_auto_init_always_suits_the_activation(activation):
    found = codes(make_spec(model={"activation": activation}))
    assert "XAVIER_WITH_RELU" not in found and "HE_WITH_SATURATING" not in found


@pytest.mark.parametrize(("init", "code"), [("zeros", "ZERO_INIT"), ("constant", "CONSTANT_INIT")])
def test_symmetric_init_is_flagged_as_danger_but_not_for_a_linear_model(init, code):
    assert only(code, make_spec(model={"init": init})).severity == "danger"
    assert code not in codes(make_spec(model={"arch": "linear", "init": init}))


def test_small_image_data_without_augmentation():
    plain = make_spec(data={"dataset": "builtin:digits"})
    assert only("NO_AUGMENTATION", plain).path == "data.augment"
    assert "NO_AUGMENTATION" not in codes(plain, n_train=50_000)
    assert "NO_AUGMENTATION" not in codes(make_spec(data={"dataset": "builtin:mnist1d"}))
    images = {"dataset": "builtin:synthetic", "synthetic": {"n_samples": 500, "shape": [1, 8, 8]}}
    assert "NO_AUGMENTATION" in codes(make_spec(data=images))


@pytest.mark.parametrize(
    ("transfer", "n_train", "fires"),
    [
        ({"freeze": "large"}, None, True),
        ({"freeze": "large"}, 50_000, False),
        ({"freeze": "medium"}, None, False),
        ({"freeze": "large", "early_lr_factor": 0.1}, None, False),
        ({"trainable_last": 1}, None, True),  # the default mlp has one block: all of it trains
        ({"trainable_last": 0}, None, False),
    ],
)
def test_a_fully_trainable_transferred_model_on_little_data(transfer, n_train, fires):
    spec = make_spec(transfer={"from_job": "job_abc", **transfer})
    assert ("UNFROZEN_TRANSFER" in codes(spec, n_train)) == fires


def test_unfrozen_transfer_points_at_the_field_to_change():
    spec = make_spec(transfer={"from_job": "job_abc", "trainable_last": 3})
    assert only("UNFROZEN_TRANSFER", spec).path == "transfer.trainable_last"


@pytest.mark.parametrize(
    ("optim", "model", "code"),
    [
        ({"name": "sgd"}, {}, "SGD_NO_MOMENTUM"),
        ({"name": "adagrad"}, {"arch": "cnn", "layers": [8]}, "ADAGRAD_DEEP"),
        ({"name": "adam", "lr": 0.02}, {}, "ADAM_HIGH_LR"),
        ({"name": "adamw", "lr": 0.1}, {}, "ADAM_HIGH_LR"),
    ],
)
def test_optimizer_advice(optim, model, code):
    assert only(code, make_spec(optim=optim, model=model)).path.startswith("optim.")


@pytest.mark.parametrize(
    "optim", [{"name": "momentum"}, {"name": "nesterov"}, {"name": "adagrad"}, {"name": "adam", "lr": 0.01}]
)
def test_good_optimizer_choices_get_no_advice(optim):
    assert codes(make_spec(optim=optim)) == []


def test_many_epochs_without_early_stopping():
    assert "NO_EARLY_STOPPING" in codes(make_spec(train={"epochs": 30}))
    assert "NO_EARLY_STOPPING" not in codes(make_spec(train={"epochs": 29}))
    stopping = {"patience": 5, "restore_best_weights": True}
    assert codes(make_spec(train={"epochs": 100, "early_stopping": stopping})) == []


def test_early_stopping_with_patience_that_keeps_the_last_weights():
    spec = make_spec(train={"early_stopping": {"patience": 5}})
    assert only("NO_RESTORE_BEST", spec).severity == "info"
    assert codes(make_spec(train={"early_stopping": {"patience": 0}})) == []


def test_inputs_left_unnormalized():
    assert only("NO_NORMALIZATION", make_spec(data={**AUGMENTED, "normalize": "none"})).path == "data.normalize"
    assert codes(make_spec(data={"dataset": "builtin:mnist1d", "normalize": "none"})) == []


def test_deep_nets_without_batch_norm_or_with_sigmoid():
    deep, shallow = [16] * 4, [16] * 3
    assert "NO_BATCH_NORM" in codes(make_spec(model={"layers": deep, "batch_norm": False}))
    assert "NO_BATCH_NORM" not in codes(make_spec(model={"layers": shallow, "batch_norm": False}))
    assert "SIGMOID_DEEP" in codes(make_spec(model={"layers": deep, "activation": "sigmoid"}))
    assert "SIGMOID_DEEP" not in codes(make_spec(model={"layers": shallow, "activation": "sigmoid"}))


def test_training_set_size_is_estimated_from_the_builtin_dataset_and_filters():
    assert estimate_train_size(make_spec()) == int(1797 * 0.7)
    assert estimate_train_size(make_spec(data={**AUGMENTED, "classes": [0, 1]})) == int(1797 * 0.7 * 2 / 10)
    assert estimate_train_size(make_spec(data={**AUGMENTED, "max_per_class": 5})) == 50
    assert estimate_train_size(make_spec(data={"dataset": "builtin:mnist1d"})) == int(4000 * 0.85)
    assert estimate_train_size(make_spec(data={"dataset": "ds_abcdef12"})) is None


def test_every_advice_is_one_sentence_about_a_real_spec_path():
    spec = make_spec(
        data={"dataset": "builtin:digits", "normalize": "none"},
        model={"layers": [8] * 4, "batch_norm": False, "activation": "sigmoid", "init": "zeros", "dropout": 0.9},
        transfer={"from_job": "job_abc", "freeze": "large"},
        optim={"name": "sgd"},
        train={"epochs": 50},
    )
    found = advise(spec)
    assert {a.code for a in found} == {
        "NO_NORMALIZATION",
        "NO_AUGMENTATION",
        "NO_BATCH_NORM",
        "SIGMOID_DEEP",
        "ZERO_INIT",
        "DROPOUT_RANGE",
        "UNFROZEN_TRANSFER",
        "SGD_NO_MOMENTUM",
        "NO_EARLY_STOPPING",
    }
    dumped = spec.model_dump()
    for advice in found:
        assert advice.message.endswith(".") and advice.message.count(". ") == 0, advice.message
        section, *rest = advice.path.split(".")
        assert rest[0] in dumped[section], advice.path
