"""Dataset loading: sources, splits, class filtering, label noise and normalization."""

import csv
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from core.engine import budget, data, files
from core.engine.data import load_data
from core.engine.files import describe_dataset
from core.spec import BUILTINS, DataSpec, SpecError, builtin_info


def make_spec(**overrides) -> DataSpec:
    return DataSpec.model_validate({"dataset": "builtin:digits", **overrides})


def synthetic(shape=None, n=600, **overrides) -> DataSpec:
    return make_spec(dataset="builtin:synthetic", synthetic={"n_samples": n, "shape": shape}, **overrides)


def write_npz(tmp_path, n=60, shape=(4,), k=3, **arrays):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(n, *shape)), "y": np.arange(n) % k, **arrays}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(len(x), -1)}


# ----------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_by_seed_and_disjoint():
    spec = synthetic(normalize="none")
    a, b = load_data(spec), load_data(spec)
    other = load_data(synthetic(normalize="none", split={"seed": 1}))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert not torch.equal(a.x_train, other.x_train)
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (420, 90, 90)
    assert not rows(a.x_train) & rows(a.x_val) and not rows(a.x_train) & rows(a.x_test)
    assert not rows(a.x_val) & rows(a.x_test)


def test_dataset_own_test_split_is_kept_and_val_carved_from_the_rest(tmp_path):
    x_test = np.arange(40, dtype=np.float32).reshape(10, 4)
    path = write_npz(tmp_path, n=60, x_test=x_test, y_test=np.arange(10) % 3)
    b = load_data(make_spec(dataset=path, normalize="none", split={"val": 0.2, "test": 0.5}))
    assert torch.equal(b.x_test, torch.from_numpy(x_test))
    assert (len(b.x_train), len(b.x_val)) == (48, 12)
    assert describe_dataset(path)["has_test_split"] is True


def test_too_few_examples_for_the_split(tmp_path):
    with pytest.raises(SpecError, match="training"):
        load_data(make_spec(dataset=write_npz(tmp_path, n=4, k=2), split={"val": 0.4, "test": 0.4}))


# ---------------------------------------------------------------------------------- normalization


def test_standardize_uses_training_statistics_per_channel():
    b = load_data(synthetic(shape=[3, 4, 4]))
    train, val = b.x_train.transpose(0, 1).reshape(3, -1), b.x_val.transpose(0, 1).reshape(3, -1)
    assert train.mean(1).abs().max() < 1e-5
    assert torch.allclose(train.std(1, unbiased=False), torch.ones(3), atol=1e-4)
    assert val.mean(1).abs().max() > 1e-3  # statistics did not come from val
    assert b.shift.shape == b.scale.shape == (3, 1, 1)


def test_minmax_maps_training_range_to_unit_interval_per_feature():
    b = load_data(synthetic(normalize="minmax"))
    assert torch.allclose(b.x_train.min(0).values, torch.zeros(20))
    assert torch.allclose(b.x_train.max(0).values, torch.ones(20))
    assert b.shift.shape == (20,)


def test_constant_feature_does_not_divide_by_zero(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3))
    x[:, 1] = 7.0
    b = load_data(make_spec(dataset=write_npz(tmp_path, n=40, x=x)))
    assert torch.isfinite(b.x_train).all() and b.scale[1] == 1


def test_none_keeps_raw_values():
    b = load_data(make_spec(normalize="none"))
    assert b.kind == "image" and b.input_shape == (1, 8, 8)
    assert b.x_train.max() == 16 and b.x_train.dtype == torch.float32 and b.y_train.dtype == torch.int64
    assert torch.equal(b.scale, torch.ones(1, 1, 1))


# -------------------------------------------------------------------------------------- labels


def test_classes_are_filtered_and_relabelled_in_the_given_order():
    from sklearn.datasets import load_digits

    raw_x, raw_y = load_digits(return_X_y=True)
    b = load_data(make_spec(classes=[7, 5], normalize="none"))
    assert b.n_classes == 2 and b.classes == ["7", "5"]
    for y in (b.y_train, b.y_val, b.y_test):
        assert set(y.tolist()) == {0, 1}
    sevens = rows(torch.from_numpy(raw_x[raw_y == 7].astype(np.float32)))
    assert rows(b.x_train[b.y_train == 0]) <= sevens


def test_classes_not_in_the_dataset_are_rejected():
    with pytest.raises(SpecError) as e:
        load_data(make_spec(classes=[3, 42]))
    assert e.value.path == "data.classes" and "42" in e.value.message


def test_max_per_class_caps_training_examples_only():
    full, capped = load_data(make_spec()), load_data(make_spec(max_per_class=5))
    assert torch.bincount(capped.y_train).tolist() == [5] * 10
    assert torch.equal(full.y_val, capped.y_val) and torch.equal(full.y_test, capped.y_test)


def test_label_noise_flips_that_fraction_of_train_and_val_but_no_test_label():
    clean, noisy = load_data(make_spec()), load_data(make_spec(label_noise=0.2))
    assert torch.equal(clean.x_train, noisy.x_train)  # same split, only labels change
    for a, b in ((clean.y_train, noisy.y_train), (clean.y_val, noisy.y_val)):
        assert (a != b).sum().item() == round(0.2 * len(a))
    assert torch.equal(clean.y_test, noisy.y_test)
    assert torch.equal(noisy.y_train, load_data(make_spec(label_noise=0.2)).y_train)


# ------------------------------------------------------------------------------------- builtins


def test_every_builtin_dataset_has_a_loader_and_every_loader_a_table_entry():
    assert set(data.LOADERS) == set(BUILTINS)


@pytest.mark.parametrize(
    "spec",
    [
        *(make_spec(dataset=name) for name in BUILTINS),
        make_spec(dataset="builtin:synthetic", synthetic={"n_samples": 300, "n_classes": 5, "shape": [3, 6, 6]}),
        synthetic(shape=[2, 10], n=250),
    ],
    ids=lambda spec: f"{spec.dataset}:{spec.synthetic.shape}",
)
def test_builtin_table_describes_what_the_loader_returns(spec: DataSpec):
    info, raw = builtin_info(spec), data.LOADERS[spec.dataset](spec, None)
    assert info is not None
    assert (raw.x.shape[1:], files.KINDS[raw.x.ndim]) == (info.input_shape, info.kind)
    assert list(np.unique(raw.y)) == raw.values == list(range(info.n_classes))
    assert len(raw.y) == info.n_examples and info.ships_test_split == (raw.test is not None)
    if raw.test is not None:
        assert raw.test[0].shape == (info.n_test, *info.input_shape) and set(np.unique(raw.test[1])) <= set(raw.values)
    if info.normalized:
        assert abs(raw.x.mean()) < 0.05 and abs(raw.x.std() - 1) < 0.05


def test_mnist1d_uses_its_own_split_and_leaves_global_rngs_alone():
    data._mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()
    b = load_data(make_spec(dataset="builtin:mnist1d"))
    assert random.getstate() == py_state
    assert all(np.array_equal(a, c) for a, c in zip(np_state[1:3], np.random.get_state()[1:3], strict=True))
    assert (len(b.x_train) + len(b.x_val), len(b.x_test)) == (4000, 1000)
    assert b.input_shape == (1, 40) and b.kind == "signal" and b.n_classes == 10


def test_synthetic_is_deterministic_and_learnable():
    a, b = load_data(synthetic(shape=[2, 10])), load_data(synthetic(shape=[2, 10]))
    assert torch.equal(a.x_train, b.x_train) and a.kind == "signal"
    centres = torch.stack([a.x_train[a.y_train == c].mean(0) for c in range(3)]).flatten(1)
    nearest = torch.cdist(a.x_val.flatten(1), centres).argmin(1)
    assert (nearest == a.y_val).float().mean() > 0.8


# ---------------------------------------------------------------------------------------- files


def test_npz_kinds_and_string_labels(tmp_path):
    path = write_npz(tmp_path, n=30, shape=(2, 9), y=np.array(["b", "a", "c"] * 10))
    b = load_data(make_spec(dataset=path))
    assert b.kind == "signal" and b.input_shape == (2, 9) and b.classes == ["a", "b", "c"]
    info = describe_dataset(path)
    assert info == {"shape": [2, 9], "kind": "signal", "n_examples": 30, "n_classes": 3,
                    "classes": ["a", "b", "c"], "has_test_split": False}  # fmt: skip


def test_npz_without_y_or_with_one_class_is_rejected(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 2)))
    with pytest.raises(SpecError, match="needs arrays x and y"):
        describe_dataset(tmp_path / "a.npz")
    with pytest.raises(SpecError, match="at least 2 classes"):
        describe_dataset(write_npz(tmp_path, k=1))
    with pytest.raises(SpecError, match="NaN"):
        describe_dataset(write_npz(tmp_path, x_test=np.full((3, 4), np.nan), y_test=np.arange(3)))


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as e:
        load_data(make_spec(dataset=str(tmp_path / "nope.npz")))
    assert e.value.path == "data.dataset"


def write_csv(tmp_path, header, body):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return str(path)


def test_csv_with_string_labels(tmp_path):
    body = [[i, i * 0.5, "dog" if i % 2 else "cat"] for i in range(20)]
    path = write_csv(tmp_path, ["a", "b", "kind"], body)
    b = load_data(make_spec(dataset=path, label_column="kind", normalize="none"))
    assert b.kind == "vector" and b.input_shape == (2,) and b.classes == ["cat", "dog"]
    assert torch.equal(b.x_train[:, 1], b.x_train[:, 0] * 0.5)


def test_csv_numeric_labels_keep_their_values(tmp_path):
    path = write_csv(tmp_path, ["a", "label"], [[i, (2, 10, 3)[i % 3]] for i in range(30)])
    b = load_data(make_spec(dataset=path, classes=[10, 2], normalize="none"))
    assert b.classes == ["10", "2"]
    assert torch.equal(b.x_train[b.y_train == 0, 0] % 3, torch.ones((b.y_train == 0).sum().item()))


def test_csv_non_numeric_feature_and_missing_label_column(tmp_path):
    path = write_csv(tmp_path, ["a", "colour", "label"], [[1, "red", 0], [2, "blue", 1]])
    with pytest.raises(SpecError, match="'colour' is not numeric"):
        describe_dataset(path)
    with pytest.raises(SpecError) as e:
        load_data(make_spec(dataset=path, label_column="target"))
    assert e.value.path == "data.label_column"


def write_zip(tmp_path, members: dict[str, Image.Image | bytes]) -> str:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, item in members.items():
            if isinstance(item, Image.Image):
                buf = tmp_path / "tmp.png"
                item.save(buf)
                item = buf.read_bytes()
            zf.writestr(name, item)
    return str(path)


def test_zip_of_class_folders_resizes_to_the_first_image(tmp_path):
    gray = {f"root/{c}/{i}.png": Image.new("L", (6 + i, 5), 10 * i) for c in ("0", "1") for i in range(3)}
    info = describe_dataset(write_zip(tmp_path, gray))
    assert info["shape"] == [1, 5, 6] and info["kind"] == "image" and info["classes"] == ["0", "1"]
    mixed = {**gray, "root/1/rgb.png": Image.new("RGB", (9, 9), (255, 0, 0))}
    b = load_data(make_spec(dataset=write_zip(tmp_path, mixed), split={"val": 0.15, "test": 0.15}))
    assert b.input_shape == (3, 5, 6) and b.n_classes == 2


@pytest.mark.parametrize("name", ["../evil/1.png", "/abs/1.png", "a/../../b/1.png"])
def test_zip_path_traversal_is_rejected(tmp_path, name):
    path = write_zip(tmp_path, {"a/1.png": Image.new("L", (4, 4)), name: Image.new("L", (4, 4))})
    with pytest.raises(SpecError, match="unsafe path"):
        describe_dataset(path)


def test_zip_entry_count_and_size_limits(tmp_path, monkeypatch):
    path = write_zip(tmp_path, {f"{c}/{i}.png": Image.new("L", (4, 4)) for c in "ab" for i in range(3)})
    monkeypatch.setattr(budget, "MAX_ZIP_ENTRIES", 5)
    with pytest.raises(SpecError, match="entries"):
        describe_dataset(path)
    monkeypatch.setattr(budget, "MAX_ZIP_ENTRIES", 100)
    monkeypatch.setattr(budget, "MAX_ZIP_BYTES", 100)
    with pytest.raises(budget.DatasetTooLarge, match="unpack to .* bytes; at most 100 bytes"):
        describe_dataset(path)


def test_image_augmentation_on_a_vector_file_is_a_spec_error(tmp_path):
    spec = make_spec(dataset=write_npz(tmp_path), augment={"rotate": {"degrees": 5}})
    with pytest.raises(SpecError) as e:
        load_data(spec)
    assert e.value.path == "data.augment.rotate"
    assert load_data(make_spec(dataset=write_npz(tmp_path), augment={"noise": {"std": 0.1}})).kind == "vector"


def test_signal_file_rejects_vertical_flip_but_allows_horizontal(tmp_path):
    path = write_npz(tmp_path, shape=(1, 12))
    with pytest.raises(SpecError) as e:
        load_data(make_spec(dataset=path, augment={"flip": {"vertical": True}}))
    assert e.value.path == "data.augment.flip.vertical"
    assert load_data(make_spec(dataset=path, augment={"flip": {}, "contrast": {}})).kind == "signal"


def test_synthetic_features_can_have_scales_of_their_own_which_standardize_undoes():
    scaled = {"n_samples": 600, "n_features": 8, "scale_range": [1.0, 10_000.0]}
    raw = load_data(make_spec(dataset="builtin:synthetic", synthetic=scaled, normalize="none"))
    spread = raw.x_train.std(dim=0)
    assert float(spread.max() / spread.min()) > 1000 and bool((raw.x_train > 0).float().mean() > 0.95)
    unit = load_data(
        make_spec(dataset="builtin:synthetic", synthetic={**scaled, "scale_range": None}, normalize="none")
    )
    assert float(unit.x_train.std(dim=0).max()) < 3  # without it, every feature is on one scale
    standard = load_data(make_spec(dataset="builtin:synthetic", synthetic=scaled, normalize="standardize"))
    assert torch.allclose(standard.x_train.std(dim=0), torch.ones(8), atol=0.05)
