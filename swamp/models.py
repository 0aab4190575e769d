"""Model registry: ``build_model(config, input_shape, num_classes)`` -> a dense ``nn.Module``.

Names: ``mlp`` (``hidden`` sizes; LeNet-300-100 is ``[300, 100]``), ``lenet5`` (LeNet-5-style
CNN with "same" padding in both convs: 107,786 parameters on 28x28 inputs, where the classic
LeNet-5 has 61,706),
OpenLTH ``cifar_resnet_D[_W]`` (D = 6n + 2, width W, default 16), ``wrn_D_k`` (pre-activation
wide ResNet, D = 6n + 4), ``cifar_vgg_{11,13,16,19}``, torchvision ``resnet50``. ``model.init``
``openlth`` (the default) initialises them all as OpenLTH does; ``torch`` keeps PyTorch's.

Your own architecture: ``package.module:function`` (importable) or ``path/to/file.py:function``
names a factory ``function(input_shape, num_classes) -> nn.Module``; ``model.init`` applies to it
too (``torch`` keeps the factory's initialisation).
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swamp.config import ConfigError, ModelConfig, factory_file

__all__ = ["build_model"]


def _mlp(hidden, input_shape, classes) -> nn.Module:
    fan_in, layers = 1, [nn.Flatten()]
    for d in input_shape:
        fan_in *= d
    for width in hidden:
        layers += [nn.Linear(fan_in, width), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


def _lenet5(input_shape, classes) -> nn.Module:
    channels, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * (h // 4) * (w // 4), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, classes))


class _ResNetBlock(nn.Module):
    """OpenLTH CIFAR ResNet block: conv-bn-relu-conv-bn + (projected) shortcut, relu."""

    def __init__(self, f_in: int, f_out: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.shortcut = nn.Sequential()
        if downsample or f_in != f_out:
            self.shortcut = nn.Sequential(nn.Conv2d(f_in, f_out, 1, stride, bias=False), nn.BatchNorm2d(f_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _CifarResNet(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int, classes: int):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, f_in = [], width
        for stage in range(3):
            f_out = width * 2 ** stage
            for i in range(n):
                blocks.append(_ResNetBlock(f_in, f_out, downsample=stage > 0 and i == 0))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(f_in, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _WideBlock(nn.Module):
    """Pre-activation wide ResNet block (Zagoruyko & Komodakis)."""

    def __init__(self, f_in: int, f_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(f_in)
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.conv2 = nn.Conv2d(f_out, f_out, 3, 1, 1, bias=False)
        self.shortcut = None if stride == 1 and f_in == f_out else nn.Conv2d(f_in, f_out, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class _WideResNet(nn.Module):
    def __init__(self, depth: int, k: int, in_channels: int, classes: int):
        super().__init__()
        n = (depth - 4) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, f_in = [], 16
        for stage, f_out in enumerate((16 * k, 32 * k, 64 * k)):
            for i in range(n):
                blocks.append(_WideBlock(f_in, f_out, 2 if stage > 0 and i == 0 else 1))
                f_in = f_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(f_in)
        self.fc = nn.Linear(f_in, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


_VGG = {11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
        13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
        16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
        19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
             512, 512, 512, 512]}


class _CifarVGG(nn.Module):
    """OpenLTH CIFAR VGG: 3x3 conv-bn-relu stacks with max pools, global pool, ``fc``."""

    def __init__(self, depth: int, in_channels: int, classes: int):
        super().__init__()
        layers, f_in = [], in_channels
        for spec in _VGG[depth]:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(f_in, spec, 3, padding=1), nn.BatchNorm2d(spec), nn.ReLU()]
                f_in = spec
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(f_in, classes)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The dense model ``config.name`` for inputs ``[N, *input_shape]`` and ``num_classes`` outputs,
    initialised as ``config.init`` says."""
    model = _architecture(config, input_shape, num_classes)
    _check_input_fits(model, config.name, input_shape)
    if config.init == "openlth":
        _openlth_init_(model)
    return model


def _check_input_fits(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Raise ConfigError unless ``model`` takes a batch of ``input_shape``: a forward pass of a
    copy on the meta device (shapes only, no compute), or where that cannot run (a data-dependent
    op such as ``.item()``), of a copy in eval mode on a CPU batch of zeros. ``model`` itself is
    not touched."""
    try:
        with torch.no_grad():
            copy.deepcopy(model).to("meta").eval()(torch.empty(2, *input_shape, device="meta"))
        return
    except (RuntimeError, NotImplementedError):
        pass
    try:
        with torch.no_grad():
            copy.deepcopy(model).eval()(torch.zeros(2, *input_shape))
    except Exception as error:   # whatever a user's forward raises on a batch it cannot take
        raise ConfigError(f"config key 'model.name': {name} does not take the data's inputs of shape "
                          f"{list(input_shape)} ({type(error).__name__}: {error})") from None


def _openlth_init_(model: nn.Module) -> None:
    """OpenLTH's default initialisation (every model of its registry): conv and linear weights
    kaiming-normal (fan in, ReLU gain; biases as PyTorch made them), BatchNorm scales uniform in
    [0, 1) and shifts 0."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight)
            nn.init.zeros_(module.bias)


def _factory(name: str):
    """The function ``name`` (``module:function`` or ``file.py:function``) names; ConfigError
    naming model.name where it cannot be found (an error inside the user's module is raised as is)."""
    where, _, function = name.rpartition(":")
    if not where or not function:
        raise ConfigError(f"config key 'model.name': {name!r} names no factory; write package.module:function "
                          "or path/to/file.py:function")
    if factory_file(name):
        if not Path(where).is_file():
            raise ConfigError(f"config key 'model.name': {name!r}: no file {where} (for a run whose factory file "
                              f"moved, `swamp resume RUN_DIR --set model.name=NEW/{Path(where).name}:{function}` "
                              "records its new place)")
        folder = str(Path(where).parent)
        if folder not in sys.path:   # its imports of the files beside it work, as when Python runs it
            sys.path.insert(0, folder)
        spec = importlib.util.spec_from_file_location(   # one module name per file: two files never collide
            f"swamp_model_{hashlib.sha1(where.encode()).hexdigest()[:12]}", where)
        module = sys.modules.get(spec.name)   # run once per process, as an import is
        if module is None:
            module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[spec.name]   # half run: the next build runs it again
                raise
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as error:
            if error.name is None or not (where == error.name or where.startswith(error.name + ".")):
                raise   # the module was found; an import inside it failed
            raise ConfigError(f"config key 'model.name': {name!r}: no module {where} on the Python path "
                              "(install it, set PYTHONPATH, or name its file: path/to/file.py:function)") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ConfigError(f"config key 'model.name': {name!r}: {where} has no function {function}")
    return factory


def _architecture(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    name = config.name
    if ":" in name:
        model = _factory(name)(tuple(input_shape), num_classes)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"config key 'model.name': {name!r} returned a {type(model).__name__}, not an nn.Module")
        return model
    image = len(input_shape) == 3
    if name == "mlp":
        return _mlp(config.hidden, input_shape, num_classes)
    if not image:
        raise ConfigError(f"model.name {name!r} needs image inputs [C, H, W], the data has {input_shape}")
    channels = input_shape[0]
    if name == "lenet5":
        return _lenet5(input_shape, num_classes)
    if match := re.fullmatch(r"cifar_resnet_(\d+)(?:_(\d+))?", name):
        depth, width = int(match[1]), int(match[2] or 16)
        if (depth - 2) % 6 or depth < 8:
            raise ConfigError(f"model.name {name!r}: depth must be 6n + 2 (20, 32, 44, 56, 110)")
        return _CifarResNet(depth, width, channels, num_classes)
    if match := re.fullmatch(r"wrn_(\d+)_(\d+)", name):
        depth, k = int(match[1]), int(match[2])
        if (depth - 4) % 6 or depth < 10:
            raise ConfigError(f"model.name {name!r}: depth must be 6n + 4 (16, 22, 28, 40)")
        return _WideResNet(depth, k, channels, num_classes)
    if match := re.fullmatch(r"cifar_vgg_(\d+)", name):
        if int(match[1]) not in _VGG:
            raise ConfigError(f"model.name {name!r}: VGG depth must be one of 11, 13, 16, 19")
        return _CifarVGG(int(match[1]), channels, num_classes)
    if name == "resnet50":
        import torchvision
        return torchvision.models.resnet50(num_classes=num_classes)
    raise ConfigError(f"model.name {name!r} is unknown; choose mlp, lenet5, cifar_resnet_D[_W], "
                      "wrn_D_k, cifar_vgg_{11,13,16,19} or resnet50, or name your own factory: "
                      "package.module:function or path/to/file.py:function")
