"""The job spec: the one contract shared by the API, the database, the worker and the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATASET_ID = re.compile(r"^ds_[A-Za-z0-9]{6,40}$")
MONITORS = ("train/loss", "train/acc", "val/loss", "val/acc")
# Which direction improves each monitorable value; mirrors Keras' `mode="auto"` (loss down, accuracy up).
MONITOR_MODE = {"loss": "min", "acc": "max", "accuracy": "max"}
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# torch and numpy take seeds as 64-bit integers; below 2**63 a seed also fits every signed 64-bit column and tensor.
Seed = Annotated[int, Field(ge=0, lt=2**63)]
InputKind = Literal["image", "signal", "vector"]


class Strict(BaseModel):
    """Base for every spec part: unknown fields are an error, assignments are re-validated, numbers are finite and
    text holds no NUL character."""

    # NaN and Infinity are not JSON: a stored spec would read them back as null, and PostgreSQL refuses them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, v: Any) -> Any:
        # PostgreSQL text cannot hold NUL, and no name, path or label needs one.
        if isinstance(v, str) and "\x00" in v:
            raise ValueError("must not contain NUL characters")
        return v


# ---------------------------------------------------------------------------------------------- data


class SplitSpec(Strict):
    val: float = Field(0.15, ge=0.0, lt=0.9, description="fraction of the examples held out for validation")
    test: float = Field(
        0.15,
        ge=0.0,
        lt=0.9,
        description="fraction held out for the final test; ignored when the dataset ships its own test split",
    )
    seed: Seed = Field(0, description="seed of the shuffle that assigns examples to splits")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitSpec:
        if self.val + self.test >= 0.9:
            raise ValueError("val + test must be below 0.9 so that training data remains")
        return self


class SyntheticSpec(Strict):
    n_samples: int = Field(1200, ge=20, le=2_000_000, description="number of examples generated (count)")
    n_features: int = Field(20, ge=1, le=100_000, description="features per example when shape is not set")
    n_classes: int = Field(3, ge=2, le=1000, description="number of classes")
    shape: list[int] | None = Field(
        None,
        min_length=2,
        max_length=3,
        description="per-example shape: [C, L] for 1-D signals or [C, H, W] for images; null for flat vectors",
    )
    class_sep: float = Field(1.0, gt=0, le=100, description="distance between class centres (feature units)")
    scale_range: tuple[float, float] | None = Field(
        None,
        description="[low, high]: give the features very different scales, as tabular data has (an age in years, a "
        "distance in kilometres): feature j is multiplied by a scale between low and high (log-spaced, in a "
        "shuffled order) and shifted by twice it, so every feature is positive; null keeps unit scales",
    )
    seed: Seed = Field(0, description="seed of the generator")

    @field_validator("scale_range")
    @classmethod
    def _scales(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1] <= 1e9:
            raise ValueError("scale_range needs 0 < low <= high <= 1e9")
        return v

    @field_validator("shape")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(d < 1 for d in v):
            raise ValueError("every dimension must be >= 1")
        if v is not None and (v[0] > 64 or any(d > 1024 for d in v[1:])):
            raise ValueError("at most 64 channels and 1024 per spatial dimension")
        return v


class RotateSpec(Strict):
    degrees: float = Field(10.0, gt=0, le=180, description="maximum rotation either way (degrees)")
    p: Probability = Field(0.5, description="probability that an example is rotated")


class FlipSpec(Strict):
    horizontal: bool = Field(True, description="mirror left-right")
    vertical: bool = Field(False, description="mirror top-bottom")
    p: Probability = Field(0.5, description="probability of each enabled flip, drawn per example")

    @model_validator(mode="after")
    def _some_axis(self) -> FlipSpec:
        if not (self.horizontal or self.vertical):
            raise ValueError("enable horizontal or vertical")
        return self


class CropSpec(Strict):
    scale: tuple[float, float] = Field(
        (0.8, 1.0), description="range of the kept area as a fraction of the image (random resized crop)"
    )
    ratio: tuple[float, float] = Field((0.75, 1.3333), description="range of the crop's aspect ratio (w/h)")
    p: Probability = Field(0.5, description="probability that an example is cropped")

    @field_validator("scale", "ratio")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1]):
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v

    @field_validator("scale")
    @classmethod
    def _at_most_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1.0:
            raise ValueError("the kept area cannot exceed 1.0 of the image")
        return v


class NoiseSpec(Strict):
    std: float = Field(0.05, gt=0, le=10, description="standard deviation of added Gaussian noise (input units)")
    p: Probability = Field(0.3, description="probability that an example gets noise")


class ColorSpec(Strict):
    brightness: float = Field(0.2, ge=0, le=1, description="maximum relative brightness change (fraction)")
    saturation: float = Field(0.2, ge=0, le=1, description="maximum relative saturation change; RGB only")
    hue: float = Field(0.02, ge=0, le=0.5, description="maximum hue rotation (fraction of a turn); RGB only")
    p: Probability = Field(0.3, description="probability that an example's colours are shifted")


class ContrastSpec(Strict):
    range: tuple[float, float] = Field((0.8, 1.2), description="range of the contrast factor (1.0 = unchanged)")
    p: Probability = Field(0.3, description="probability that an example's contrast changes")

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 <= v[0] <= v[1] <= 10):
            raise ValueError("must be [low, high] with 0 <= low <= high <= 10")
        return v


class AugmentSpec(Strict):
    """Training-batch augmentation; each part is off unless given. Parameters are drawn per example."""

    rotate: RotateSpec | None = Field(None, description="random rotation (images)")
    flip: FlipSpec | None = Field(None, description="random mirror (images; horizontal also for 1-D signals)")
    crop: CropSpec | None = Field(None, description="random resized crop (images)")
    noise: NoiseSpec | None = Field(None, description="additive Gaussian noise (any input)")
    color: ColorSpec | None = Field(None, description="brightness, saturation, hue (images)")
    contrast: ContrastSpec | None = Field(None, description="contrast around each example's mean (images, signals)")

    def enabled(self) -> list[str]:
        """Names of the augmentations that are on, in the order they are applied."""
        return [name for name in ("crop", "rotate", "flip", "color", "contrast", "noise") if getattr(self, name)]


# ----------------------------------------------------------------------------------- built-in datasets


@dataclass(frozen=True)
class BuiltinDataset:
    """What a built-in dataset holds, known without loading it (tests/engine/test_data.py checks it)."""

    name: str
    kind: InputKind
    input_shape: tuple[int, ...]  # of one example
    n_classes: int
    n_examples: int  # besides the test split the dataset ships; split.val and split.test apply to these
    description: str
    n_test: int = 0  # examples of the dataset's own test split
    normalized: bool = False  # standardized by its generator already

    @property
    def ships_test_split(self) -> bool:
        return self.n_test > 0


def _synthetic_sized(s: SyntheticSpec) -> BuiltinDataset:
    """builtin:synthetic with the kind, shape and sizes that `s` asks for."""
    shape = tuple(s.shape) if s.shape else (s.n_features,)
    kind: InputKind = "vector" if len(shape) == 1 else ("signal" if len(shape) == 2 else "image")
    description = "Gaussian classes of the shape and sizes given in data.synthetic"
    return BuiltinDataset("builtin:synthetic", kind, shape, s.n_classes, s.n_samples, description)


BUILTINS: dict[str, BuiltinDataset] = {
    b.name: b
    for b in (
        BuiltinDataset("builtin:digits", "image", (1, 8, 8), 10, 1797, "8x8 images of handwritten digits"),
        BuiltinDataset(
            "builtin:mnist1d",
            "signal",
            (1, 40),
            10,
            4000,
            "standardized 1-D signals of 40 samples, with their own test split",
            n_test=1000,
            normalized=True,
        ),
        _synthetic_sized(SyntheticSpec()),  # at the defaults; builtin_info() sizes it from the spec
    )
}


class DataSpec(Strict):
    dataset: str = Field(
        "builtin:digits",
        description=" | ".join(f"{b.name} ({b.description})" for b in BUILTINS.values())
        + " | ds_<id> (uploaded) | a local .npz/.csv/.zip path (command line only)",
    )
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec, description="sizes of builtin:synthetic")
    label_column: str = Field("label", max_length=200, description="name of the label column of a .csv dataset")
    split: SplitSpec = Field(default_factory=SplitSpec, description="train/val/test split")
    normalize: Literal["none", "minmax", "standardize"] = Field(
        "standardize", description="input normalization; statistics come from the training split only"
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec, description="training-batch augmentation")
    classes: list[int] | None = Field(
        None,
        min_length=2,
        description="keep only these labels, relabelled 0..k-1 in the order given (e.g. [5,6,7,8,9])",
    )
    max_per_class: int | None = Field(
        None, ge=1, description="cap on training examples per class (scarce-data studies; count)"
    )
    label_noise: float = Field(
        0.0, ge=0.0, lt=1.0, description="fraction of train/val labels replaced by a random other class"
    )

    @field_validator("dataset")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v.startswith("builtin:") and v not in BUILTINS:
            raise ValueError(f"unknown built-in dataset; choose one of {', '.join(BUILTINS)}")
        if v.startswith("ds_") and not DATASET_ID.match(v):
            raise ValueError("dataset ids look like ds_<letters and digits>")
        if not (v.startswith(("builtin:", "ds_")) or v.endswith((".npz", ".csv", ".zip"))):
            raise ValueError("use a builtin:*, a ds_<id>, or a path ending in .npz, .csv or .zip")
        return v

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("classes must be distinct non-negative labels")
        return v


# --------------------------------------------------------------------------------------------- model

InitName = Literal[
    "auto",
    "zeros",
    "constant",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
]


class ConvLayerSpec(Strict):
    channels: int = Field(..., ge=1, le=4096, description="output channels")
    kernel: int = Field(3, ge=1, le=31, description="kernel size (samples or pixels)")
    stride: int = Field(1, ge=1, le=8, description="stride")
    padding: int | None = Field(None, ge=0, le=15, description="zero padding; null = kernel // 2")
    pool: int = Field(1, ge=1, le=8, description="max-pool size after the layer; 1 = none")


class ModelSpec(Strict):
    arch: Literal["linear", "mlp", "cnn", "resnet"] = Field("mlp", description="network family")
    layers: list[int] = Field(
        [64],
        max_length=32,
        description="mlp: hidden widths; cnn: channels of 3x3 conv layers each followed by a 2x pool; "
        "resnet: widths of the residual stages",
    )
    conv: list[ConvLayerSpec] | None = Field(
        None, max_length=32, description="cnn only: explicit conv layers (overrides layers)"
    )
    hidden: list[int] = Field(
        [], max_length=8, description="cnn/resnet: widths of dense layers between the features and the head"
    )
    activation: Literal["relu", "leaky_relu", "gelu", "tanh", "sigmoid"] = Field("relu", description="activation")
    batch_norm: bool = Field(True, description="batch normalization after each hidden layer")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="probability of dropping a hidden unit in training")
    init: InitName = Field("auto", description="weight init; auto = He for ReLU-like, Xavier for tanh/sigmoid")
    init_scale: float = Field(
        0.01, ge=0, le=10, description="std for normal, bound for uniform, value for constant init"
    )

    @field_validator("layers", "hidden")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 or w > 65536 for w in v):
            raise ValueError("widths must be between 1 and 65536")
        return v

    @model_validator(mode="after")
    def _arch_fields(self) -> ModelSpec:
        if self.conv is not None and self.arch != "cnn":
            raise ValueError("conv is only for arch: cnn")
        if self.arch in ("cnn", "resnet") and not (self.layers or self.conv):
            raise ValueError(f"arch {self.arch} needs at least one layer")
        return self


class TransferSpec(Strict):
    from_job: str | None = Field(None, description="id of a finished job whose trained weights start this one")
    from_path: str | None = Field(None, description="local run directory or .safetensors file (command line only)")
    freeze: Literal["small", "medium", "large"] = Field(
        "medium",
        description="small data: train only the head; medium: last block + head; large: train everything",
    )
    trainable_last: int | None = Field(
        None, ge=0, le=64, description="train only the last N blocks + head (overrides freeze)"
    )
    early_lr_factor: float = Field(
        1.0,
        gt=0,
        le=1,
        description="learning-rate multiplier of the first trainable block, rising geometrically to 1 at the head",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TransferSpec:
        if (self.from_job is None) == (self.from_path is None):
            raise ValueError("give exactly one of from_job or from_path")
        return self


# --------------------------------------------------------------------------------------------- optim


class ScheduleSpec(Strict):
    name: Literal["constant", "step", "cosine", "onecycle", "plateau"] = Field("constant", description="schedule")
    warmup_epochs: int = Field(0, ge=0, le=1000, description="linear warm-up from lr/100 (epochs)")
    step_size: int = Field(10, ge=1, le=10000, description="step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step: decay factor")
    min_lr: float = Field(0.0, ge=0, description="cosine/plateau: lowest learning rate")
    factor: float = Field(0.1, gt=0, lt=1, description="plateau: decay factor")
    patience: int = Field(10, ge=0, le=1000, description="plateau: epochs without improvement (Keras >= rule)")
    monitor: str = Field("val/loss", description="plateau: value watched")

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, v: str) -> str:
        return _canonical_monitor(v)


class OptimSpec(Strict):
    name: Literal["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"] = Field(
        "adam", description="optimizer"
    )
    lr: float = Field(1e-3, gt=0, le=10, description="base learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum of the momentum and nesterov optimizers")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam/adamw moment decay rates")
    alpha: float = Field(0.99, gt=0, lt=1, description="rmsprop: decay of the squared-gradient average")
    eps: float = Field(1e-8, gt=0, le=1, description="numerical stability term")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 penalty (decoupled for adamw)")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="learning-rate schedule")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v


# --------------------------------------------------------------------------------------------- train


class EarlyStoppingSpec(Strict):
    """Keras 3 EarlyStopping, field for field, with the same defaults."""

    monitor: str = Field("val/loss", description="value watched: train/loss, train/acc, val/loss, val/acc")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for losses, max for accuracies")
    patience: int = Field(0, ge=0, le=10000, description="epochs without improvement before stopping")
    min_delta: float = Field(0.0, description="smallest change that counts as improvement (absolute)")
    baseline: float | None = Field(None, description="value the monitor must beat to reset the patience count")
    restore_best_weights: bool = Field(False, description="end with the weights of the best epoch")
    start_from_epoch: int = Field(0, ge=0, description="epochs ignored before monitoring starts")

    @field_validator("monitor")
    @classmethod
    def _known_monitor(cls, v: str) -> str:
        return _canonical_monitor(v)

    @field_validator("min_delta")
    @classmethod
    def _absolute(cls, v: float) -> float:
        return abs(v)

    def resolved_mode(self) -> Literal["min", "max"]:
        """The direction of improvement, with `auto` resolved as Keras does."""
        if self.mode != "auto":
            return self.mode
        return MONITOR_MODE[self.monitor.split("/")[-1]]  # type: ignore[return-value]


class TrainSpec(Strict):
    epochs: int = Field(20, ge=1, le=10000, description="maximum number of epochs")
    batch_size: int = Field(128, ge=1, le=65536, description="examples per optimizer step")
    eval_batch_size: int = Field(2048, ge=1, le=65536, description="examples per evaluation forward pass")
    seed: Seed = Field(0, description="seed of initialization, shuffling, augmentation and dropout")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    early_stopping: EarlyStoppingSpec | None = Field(None, description="stop when the monitor stops improving")
    checkpoint_every: int = Field(1, ge=0, le=10000, description="epochs between checkpoints; 0 = only the last")
    progress_interval_s: float = Field(1.0, gt=0, le=3600, description="seconds between progress events")


class ResourcesSpec(Strict):
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda | cuda:N")
    max_runtime_s: float = Field(3600, gt=0, le=7 * 24 * 3600, description="time budget (seconds)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA")
    compile: bool = Field(False, description="torch.compile the model (CUDA)")
    max_attempts: int = Field(3, ge=1, le=10, description="attempts before a lost job fails")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,2})?", v):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v


# ------------------------------------------------------------------------------------------- the job


class JobSpec(Strict):
    """A training job: what data, which model, how to optimize, how long, on what."""

    name: str = Field("job", min_length=1, max_length=120, description="a label for people")
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    transfer: TransferSpec | None = Field(None, description="start from another run's trained weights")
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        kind = builtin_input_kind(self.data)
        image_only = [a for a in ("rotate", "crop", "color") if getattr(self.data.augment, a)]
        if kind in ("vector", "signal") and image_only:
            raise ValueError(f"data.augment.{image_only[0]}: needs image data, but {self.data.dataset} is {kind}s")
        if kind == "signal" and self.data.augment.flip and self.data.augment.flip.vertical:
            raise ValueError("data.augment.flip.vertical: needs image data")
        if kind == "vector" and (self.data.augment.flip or self.data.augment.contrast):
            raise ValueError("data.augment: flip and contrast need images or signals, not plain vectors")
        return self


def builtin_info(data: DataSpec) -> BuiltinDataset | None:
    """The built-in dataset the spec names, builtin:synthetic sized as the spec asks; None for other data."""
    if data.dataset == "builtin:synthetic":
        return _synthetic_sized(data.synthetic)
    return BUILTINS.get(data.dataset)


def builtin_input_kind(data: DataSpec) -> InputKind | None:
    """What a built-in dataset's examples are; None when only loading the file can tell."""
    info = builtin_info(data)
    return None if info is None else info.kind


def _canonical_monitor(v: str) -> str:
    # Keras spells them val_loss/val_accuracy; accept those and answer in our namespaced form.
    name = v.replace("val_", "val/").replace("train_", "train/").replace("accuracy", "acc")
    if "/" not in name:
        name = f"train/{name}"
    if name not in MONITORS:
        raise ValueError(f"unknown monitor {v!r}; choose one of {', '.join(MONITORS)}")
    return name


class SpecError(ValueError):
    """A spec that validated alone but cannot run against its data (e.g. image augmentation on vectors)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def load_spec(source: str | Path | dict[str, Any]) -> JobSpec:
    """Read a spec from a YAML/JSON file, a YAML/JSON string or a dict; raises pydantic ValidationError."""
    if isinstance(source, dict):
        return JobSpec.model_validate(source)
    text = Path(source).read_text() if isinstance(source, Path) or _is_file(source) else source
    data = yaml.safe_load(text) if text.strip() else {}
    if not isinstance(data, dict):
        raise ValueError("a spec must be a mapping of fields")
    return JobSpec.model_validate(data)


def _is_file(s: str) -> bool:
    return "\n" not in s and s.endswith((".yaml", ".yml", ".json")) and Path(s).is_file()


def spec_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Every problem of a spec as {path, message, type}, path dotted like data.augment.rotate.degrees."""
    return [
        {
            "path": ".".join(str(p) for p in err["loc"]) or "(root)",
            "message": err["msg"],
            "type": err["type"],
        }
        for err in exc.errors(include_url=False)
    ]
