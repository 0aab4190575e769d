"""Experiment configuration: typed dataclasses with defaults, YAML loading, ``a.b=value`` overrides.

Every key has a default, so an empty YAML file is a valid config (digits + MLP). Loading checks
each key's name and type against the dataclasses; :func:`validate` checks values and dataset
paths. Both raise :class:`ConfigError` naming the key, before any training starts.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "PruneConfig", "RewindConfig", "MasksConfig",
           "SWAConfig", "TrainConfig", "DistributedConfig", "METHODS", "from_dict", "to_dict", "load", "apply_overrides",
           "validate", "validate_new_run", "dump", "factory_file"]

METHODS = ("dense", "imp", "imp_swa", "swamp", "random", "snip", "grasp", "synflow")
# Pruning at the rewind point (at initialisation with rewind.iterations 0): each level's mask from the
# dense network there, by SNIP's, GraSP's or SynFlow's scores (swamp.saliency), one network trained per level.
REWIND_POINT_METHODS = ("snip", "grasp", "synflow")
DATASETS = ("digits", "npz", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "synthetic")
DATA_LAYOUTS = ("auto", "channels_first", "channels_last")   # of npz images
PRUNE_SCOPES = ("global", "layerwise")     # one threshold over all layers | one per layer
# What goes back to the rewind point after pruning: weights and lr schedule (weight rewinding,
# Frankle et al. 2020) | the lr schedule alone, the pruned solution training on (lr rewinding, Renda et al. 2020)
# | nothing: the pruned solution trains on at the schedule's last rate (fine-tuning, Han et al. 2015).
REWIND_MODES = ("weights", "lr", "finetune")
# How a run given another run's masks (masks.source) places their kept weights: as they are | at random
# inside each layer (its density kept) | at random over all layers (the density kept): OpenLTH's random-prune branches.
MASK_SHUFFLES = ("none", "layerwise", "global")
MASK_SOURCE_METHODS = ("imp", "imp_swa", "swamp")   # dense trains no masks; random draws its own
PATH_DATASETS = ("npz", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet")


DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")   # the accepted spellings of a device
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A bad config; the message names the key."""


@dataclass
class DataConfig:
    name: str = "digits"
    path: str = ""                       # file (npz) or directory (the others); unused by digits/synthetic
    layout: str = "auto"                 # npz only: auto | channels_first ([N, C, H, W]) | channels_last ([N, H, W, C])
    augment: bool = True                 # the dataset's standard augmentation (CIFAR, ImageNet; none for MNIST)
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])   # synthetic only
    classes: int = 10                    # synthetic only
    train_size: int = 1024               # synthetic only
    test_size: int = 256                 # synthetic only
    image_size: int = 224                # imagenet only: crop size
    workers: int = 4                     # imagenet only: loader processes per particle

    def __post_init__(self):
        self.path = _absolute(self.path)


def _absolute(path):
    """A path as a shell reads it (~/data), made absolute from here so that a run resumes from
    anywhere; "" (unset) and values of other types (refused by the type check) stay."""
    return os.path.abspath(os.path.expanduser(path)) if isinstance(path, str) and path else path


@dataclass
class ModelConfig:
    name: str = "mlp"                    # a registry name, or your factory: package.module:function | file.py:function
    hidden: list[int] = field(default_factory=lambda: [300, 100])   # mlp only
    init: str = "openlth"                # openlth: kaiming-normal weights, BatchNorm scale ~ U[0, 1) | torch

    def __post_init__(self):
        if isinstance(self.name, str) and (file := factory_file(self.name)):   # absolute, as data.path:
            self.name = f"{_absolute(file[0])}:{file[1]}"   # wherever resumed


def factory_file(name: str) -> tuple[str, str] | None:
    """``(file, function)`` where model.name names a factory file ``path/to/file.py:function``, else None."""
    where, colon, function = name.rpartition(":")
    return (where, function) if colon and where.endswith(".py") else None


@dataclass
class PruneConfig:
    exclude: list[str] = field(default_factory=list)   # module names (or globs) kept dense
    scope: str = "global"                # global: one threshold over all layers | layerwise: per layer
    score_batches: int = 1               # snip, grasp: training batches their scores are summed over
    score_batch_size: int = 0            # snip, grasp: examples per such batch (0: train.batch_size)


@dataclass
class RewindConfig:
    iterations: int = 500                # 0 = rewind to initialisation
    mode: str = "weights"                # see REWIND_MODES


@dataclass
class MasksConfig:
    source: str = ""                     # a run's folder: level L trains under its level-L mask (no pruning)
    shuffle: str = "none"                # see MASK_SHUFFLES

    def __post_init__(self):
        self.source = _absolute(self.source)


@dataclass
class SWAConfig:
    start: float = 0.75                  # SWA over the last (1 - start) of each level's epochs
    lr: float = 0.05                     # constant learning rate during SWA
    anneal_epochs: int = 0               # cosine anneal from the scheduled lr to swa.lr (torch's SWALR)


@dataclass
class TrainConfig:
    epochs: int = 160
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    nesterov: bool = False
    schedule: str = "step"               # step | cosine
    milestones: list[int] = field(default_factory=lambda: [80, 120])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    precision: str = "fp32"              # fp32 | bf16 (autocast)
    label_smoothing: float = 0.0         # of the cross-entropy loss (0: OpenLTH parity)
    channels_last: bool = False          # 4-D activations and weights in channels_last (one particle per process)
    compile: bool = False                # torch.compile the training step (module or vmapped particles)
    checkpoint_every: int = 1            # epochs between checkpoints inside a level; 0: only whole levels


@dataclass
class DistributedConfig:
    particle_groups: int = 1             # under torchrun: world = particle_groups x data-parallel ranks
    timeout_s: float = 900.0             # a collective waiting longer fails the job


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "swamp"
    levels: int = 10
    prune_fraction: float = 0.2
    prune: PruneConfig = field(default_factory=PruneConfig)
    rewind: RewindConfig = field(default_factory=RewindConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)
    particles: int = 4                   # used by swamp; the other methods train one network
    swa: SWAConfig = field(default_factory=SWAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"


def _check_type(key: str, hint, value):
    """``value`` converted to ``hint`` (int -> float, whole float -> int allowed), else ConfigError
    naming ``key``."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if value is None:   # a section left empty: its defaults
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(hint, value, key + ".")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)   # epochs: 3.0, or 1.0e+3
    if hint is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)   # 5e-4: YAML 1.1 (PyYAML) reads exponents without a dot as strings
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"config key {key!r} must be of type {hint.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    return value


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in hints:
            raise ConfigError(f"unknown config key {prefix + str(key)!r}; known keys here: "
                              f"{', '.join(prefix + n for n in names)}")
    return cls(**{k: _check_type(prefix + k, hints[k], v) for k, v in values.items()})


def from_dict(values: Mapping[str, Any] | None) -> Config:
    """A :class:`Config` from nested dicts; unknown keys and wrong types raise ConfigError."""
    return _build(Config, values or {})


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def changed_keys(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value in a, value in b)`` for each key whose value differs, in key order."""
    def flat(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        found = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                found.update(flat(value, f"{prefix}{key}."))
            else:
                found[prefix + key] = value
        return found
    first, second = flat(to_dict(a)), flat(to_dict(b))
    return [(key, first.get(key), second.get(key)) for key in sorted(first.keys() | second.keys())
            if first.get(key) != second.get(key)]


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to nested dicts; returns a new dict."""
    values = copy.deepcopy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = values
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if node.get(part) is None:   # absent, or a section left empty
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"config key {'.'.join(parents[:i + 1])!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from error
    return values


def load(path: str | Path, overrides: Sequence[str] = (), check_paths: bool = True) -> Config:
    """Read a YAML config, apply ``overrides``, check names, types and values (and that the
    dataset path exists, if ``check_paths``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    config = from_dict(apply_overrides(values, overrides))
    validate(config, check_paths)
    return config


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


def validate(config: Config, check_paths: bool = True) -> None:
    """Check values (ranges, choices, dataset paths); raise ConfigError naming the key."""
    _require(config.method in METHODS, "method", f"{config.method!r} is not one of {', '.join(METHODS)}")
    _require(config.data.name in DATASETS, "data.name",
             f"{config.data.name!r} is not one of {', '.join(DATASETS)}")
    if config.data.name in PATH_DATASETS and check_paths:
        _require(bool(config.data.path), "data.path", f"dataset {config.data.name} needs a path")
        _require(Path(config.data.path).exists(), "data.path",
                 f"{config.data.path!r} does not exist (dataset {config.data.name})")
    data = config.data
    _require(data.layout in DATA_LAYOUTS, "data.layout", f"must be one of {', '.join(DATA_LAYOUTS)}, got {data.layout!r}")
    for key in ("classes", "train_size", "test_size", "image_size"):
        _require(getattr(data, key) >= 1, f"data.{key}", f"must be >= 1, got {getattr(data, key)}")
    _require(data.workers >= 0, "data.workers", f"must be >= 0, got {data.workers}")
    _require(len(data.shape) >= 1 and all(d >= 1 for d in data.shape), "data.shape",
             f"must be a non-empty list of sizes >= 1, got {data.shape}")
    _require(config.particles >= 1, "particles", f"must be >= 1, got {config.particles}")
    _require(0.0 < config.prune_fraction < 1.0, "prune_fraction",
             f"must lie in (0, 1), got {config.prune_fraction}")
    _require(config.prune.scope in PRUNE_SCOPES, "prune.scope",
             f"must be one of {', '.join(PRUNE_SCOPES)}, got {config.prune.scope!r}")
    _require(config.levels >= 0, "levels", f"must be >= 0, got {config.levels}")
    _require(config.prune.score_batches >= 1, "prune.score_batches", f"must be >= 1, got {config.prune.score_batches}")
    _require(config.prune.score_batch_size >= 0, "prune.score_batch_size",
             f"must be >= 0 (0: train.batch_size), got {config.prune.score_batch_size}")
    if config.method in REWIND_POINT_METHODS:
        _require(config.prune.scope == "global", "prune.scope",
                 f"method {config.method} ranks the scores of all layers together: leave it global")
        _require(config.rewind.mode == "weights", "rewind.mode", f"method {config.method} prunes the network at "
                 "the rewind point, where every level begins: leave it weights")
    _require(config.rewind.iterations >= 0, "rewind.iterations", "must be >= 0")
    _require(config.rewind.mode in REWIND_MODES, "rewind.mode",
             f"must be one of {', '.join(REWIND_MODES)}, got {config.rewind.mode!r}")
    _require(config.rewind.mode != "finetune" or config.train.schedule == "step", "rewind.mode",
             "finetune trains at the schedule's last rate, and a cosine schedule ends at 0: use train.schedule step")
    _validate_masks(config)
    _require(0.0 <= config.swa.start < 1.0, "swa.start", f"must lie in [0, 1), got {config.swa.start}")
    _require(config.swa.lr > 0, "swa.lr", "must be > 0")
    train = config.train
    swa_epochs = train.epochs - math.floor(config.swa.start * train.epochs)
    _require(0 <= config.swa.anneal_epochs <= swa_epochs, "swa.anneal_epochs",
             f"must lie in [0, {swa_epochs}] (the SWA epochs of train.epochs {train.epochs} "
             f"from swa.start {config.swa.start}), got {config.swa.anneal_epochs}")
    _require(train.epochs >= 1, "train.epochs", "must be >= 1")
    _require(train.batch_size >= 1, "train.batch_size", "must be >= 1")
    _require(train.lr > 0, "train.lr", "must be > 0")
    _require(train.momentum >= 0, "train.momentum", "must be >= 0")
    _require(train.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _require(train.schedule in ("step", "cosine"), "train.schedule", "must be step or cosine")
    _require(train.precision in ("fp32", "bf16"), "train.precision", "must be fp32 or bf16")
    _require(0 <= train.warmup_epochs < train.epochs, "train.warmup_epochs", "must lie in [0, epochs)")
    _require(not train.nesterov or train.momentum > 0, "train.nesterov", "needs train.momentum > 0")
    _require(0 <= train.label_smoothing < 1, "train.label_smoothing", "must lie in [0, 1)")
    _require(train.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    groups = config.distributed.particle_groups
    _require(groups >= 1, "distributed.particle_groups", f"must be >= 1, got {groups}")
    _require(config.distributed.timeout_s > 0, "distributed.timeout_s", "must be > 0")
    trained = config.particles if config.method == "swamp" else 1
    _require(groups == 1 or trained % groups == 0, "distributed.particle_groups",
             f"{groups} groups cannot share the {trained} particles method {config.method} trains")
    _require(DEVICE_NAME.fullmatch(config.device) is not None, "device",
             f"must be auto, cpu or cuda[:N], got {config.device!r}")
    _require(bool(config.model.hidden) or config.model.name != "mlp", "model.hidden",
             "mlp needs at least one hidden layer")
    _require(config.model.init in ("openlth", "torch"), "model.init",
             f"must be openlth or torch, got {config.model.init!r}")
    _require(all(h >= 1 for h in config.model.hidden), "model.hidden",
             f"layer widths must be >= 1, got {config.model.hidden}")
    _require(train.gamma > 0, "train.gamma", f"must be > 0, got {train.gamma}")
    _require(all(m >= 0 for m in train.milestones), "train.milestones",
             f"epochs must be >= 0, got {train.milestones}")


def _validate_masks(config: Config) -> None:
    masks = config.masks
    _require(masks.shuffle in MASK_SHUFFLES, "masks.shuffle",
             f"must be one of {', '.join(MASK_SHUFFLES)}, got {masks.shuffle!r}")
    _require(bool(masks.source) or masks.shuffle == "none", "masks.shuffle",
             f"{masks.shuffle} shuffles the masks of masks.source, which is not set")
    _require(not masks.source or config.method in MASK_SOURCE_METHODS, "masks.source",
             f"method {config.method} cannot train another run's masks (use one of {', '.join(MASK_SOURCE_METHODS)})")


def validate_new_run(config: Config) -> None:
    """Checks only a new run's config gets (ConfigError naming the key): settings that runs
    started by an earlier swamp may hold, which their data set ignores (they still resume)."""
    _require(config.data.layout == "auto" or config.data.name == "npz", "data.layout",
             f"{config.data.layout} is for npz arrays; {config.data.name} data is read in its own layout "
             "(leave it auto)")


def dump(config: Config) -> str:
    """The resolved config as YAML text (loads back to an equal Config)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
