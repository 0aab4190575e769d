"""Datasets: loaded from disk (never downloaded) into tensors, batched per particle.

:class:`TensorData` keeps a small dataset on the training device; shuffling and augmentation
(random crop with zero padding, horizontal flip) happen there. :class:`FolderData` streams an
ImageFolder (ImageNet) through DataLoaders. Both yield batches stacked over particles,
``x [P, B, ...]``, ``y [P, B]``, each particle drawing its order from its own generator.

Data parallelism: ``shard=(i, n)`` gives rank ``i`` of ``n`` the i-th contiguous ``B / n`` of
every batch (training) or every n-th batch (evaluation). The batches themselves do not depend
on ``n``, so particle p sees the same data in the same order on any number of ranks.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from swamp.config import ConfigError, DataConfig

__all__ = ["TensorData", "FolderData", "SampledBatches", "load_data", "derive_seed", "epoch_generator", "input_spec",
           "SYNTHETIC_POOL"]

Shard = tuple[int, int]   # (this rank, ranks sharing the batches)
SYNTHETIC_POOL = 512      # synthetic inputs stored; longer training sets repeat them cyclically


def _epoch_batch(batch_size: int, num_train: int, shard: Shard) -> tuple[int, slice]:
    """(the batch of an epoch, this rank's part of it): ``batch_size``, or the whole training
    set when that is smaller."""
    index, count = shard
    batch = min(batch_size, num_train)
    if batch % count:
        what = (f"train.batch_size {batch_size}" if batch == batch_size else
                f"the training set of {num_train} examples, smaller than train.batch_size, is one batch that")
        raise ValueError(f"{what} does not split over {count} data-parallel ranks; "
                         f"make it a multiple of {count}")
    size = batch // count
    return batch, slice(index * size, (index + 1) * size)


def derive_seed(*keys: int) -> int:
    """A seed in [0, 2**31) determined by the integer ``keys`` (seed, stage, particle, epoch)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key) + 7919) % (2 ** 31 - 1)
    return seed


def epoch_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


class TensorData:
    """A dataset held as tensors; ``x`` float ``[N, C, H, W]`` or ``[N, F]`` (any ``[N, C, ...]``), normalised.

    ``x_train`` may hold fewer rows than ``y_train`` (synthetic data): sample i then has input
    ``x_train[i % len(x_train)]``.
    """

    def __init__(self, x_train, y_train, x_test, y_test, num_classes: int, *,
                 crop_padding: int = 0, flip: bool = False, pad_value: torch.Tensor | float = 0.0):
        self.x_train, self.y_train = x_train, y_train.long()
        self.x_test, self.y_test = x_test, y_test.long()
        self.num_classes = num_classes
        self.crop_padding, self.flip = crop_padding, flip
        self.pad_value = torch.as_tensor(pad_value, dtype=x_train.dtype,   # per channel, with the data
                                         device=x_train.device).reshape(1, -1, 1, 1)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.y_train)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def to(self, device) -> "TensorData":
        return TensorData(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                          self.y_test.to(device), self.num_classes,
                          crop_padding=self.crop_padding, flip=self.flip, pad_value=self.pad_value)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (the last partial batch is dropped; at least one batch)."""
        return max(1, self.num_train // batch_size)

    def _epoch_plan(self, generator: torch.Generator, augment: bool):
        """One particle's epoch: a permutation, crop offsets and flips, all drawn up front."""
        n = self.num_train
        order = torch.randperm(n, generator=generator)
        offsets = flips = None
        if augment and self.crop_padding:
            offsets = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        if augment and self.flip:
            flips = torch.rand(n, generator=generator) < 0.5
        return order, offsets, flips

    def _augment(self, x, offsets, flips):
        if offsets is not None:
            pad = self.crop_padding
            b, c, h, w = x.shape
            padded = self.pad_value.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
            padded[:, :, pad:pad + h, pad:pad + w] = x
            offsets = offsets.to(x.device)
            rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[batch, channel, rows, cols]
        if flips is not None:
            x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(-1), x)
        return x

    def train_batches(self, generators: Sequence[torch.Generator], batch_size: int, augment: bool = True,
                      shard: Shard = (0, 1), skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(x [P, B/n, ...], y [P, B/n])``: this rank's part of every batch but the
        first ``skip`` (not made at all); particle p's order comes from ``generators[p]``."""
        batch_size, part = _epoch_batch(batch_size, self.num_train, shard)
        plans = [self._epoch_plan(g, augment) for g in generators]
        for step in range(skip, self.steps_per_epoch(batch_size)):
            xs, ys = [], []
            for order, offsets, flips in plans:
                start = step * batch_size
                take = slice(start + part.start, start + part.stop)
                index = order[take].to(self.device)
                xs.append(self._augment(self.x_train[index % len(self.x_train)],
                                        None if offsets is None else offsets[take],
                                        None if flips is None else flips[take]))
                ys.append(self.y_train[index])
            yield torch.stack(xs), torch.stack(ys)

    def eval_batches(self, split: str, batch_size: int,
                     shard: Shard = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-augmented batches of ``split`` ("train" or "test") in order; this rank's every n-th."""
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        index, count = shard
        for start in range(index * batch_size, len(y), count * batch_size):
            stop = min(start + batch_size, len(y))
            rows = (slice(start, stop) if stop <= len(x)    # stored rows: a view, no gather
                    else torch.arange(start, stop, device=x.device) % len(x))
            yield x[rows], y[start:stop]


class SampledBatches:
    """A re-iterable view of ``count`` un-augmented training batches ``(x, y)`` of ``data`` drawn at
    random without repeats (seed ``seed``): the same batches on every pass, fewer if an epoch
    holds fewer. Not the first batches in stored order (an ImageFolder's are a few classes)."""

    def __init__(self, data, batch_size: int, count: int, seed: int = 0):
        self.data, self.batch_size, self.count, self.seed = data, batch_size, count, seed

    def __iter__(self):
        drawn = self.data.train_batches([torch.Generator().manual_seed(self.seed)], self.batch_size, augment=False)
        return ((x[0], y[0]) for _, (x, y) in zip(range(self.count), drawn))   # [1, B, ...]: one "particle"


class _Seeded(torch.utils.data.Dataset):
    """``dataset`` read by (seed, index): the random transforms of the sample draw from torch's
    generator seeded by ``seed`` (forked: the caller's state is kept), so a sample's
    augmentation depends on its seed alone, not on the loader worker or process reading it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _folder_with_classes(directory: Path, transform, classes: list[str]):
    """An ImageFolder of ``directory`` whose labels number ``classes`` (train's) as train does;
    it may lack some of them (a subset), and a folder of another class is an error (its
    own numbering would give the wrong labels). A plain ImageFolder: loader workers started by
    spawn or forkserver unpickle it."""
    from torchvision import datasets
    folder = datasets.ImageFolder(str(directory), transform, loader=_load_image, allow_empty=True)
    unknown = sorted(set(folder.classes) - set(classes))
    if unknown:
        raise ConfigError(f"data.path: {directory} has class folders that train/ lacks: "
                          f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
    number = {name: i for i, name in enumerate(classes)}
    folder.samples = folder.imgs = [(path, number[folder.classes[label]]) for path, label in folder.samples]
    folder.targets = [label for _, label in folder.samples]
    folder.classes, folder.class_to_idx = list(classes), number
    return folder


def _load_image(path: str):
    """torchvision's ImageFolder loader (PIL, RGB), naming the file it cannot read."""
    from torchvision.datasets.folder import default_loader
    try:
        return default_loader(path)
    except (OSError, ValueError) as error:   # truncated, not an image (PIL.UnidentifiedImageError)
        raise ConfigError(f"data.path: {path} is not a readable image ({error})") from error


class FolderData:
    """ImageFolder ``train/`` and ``val/`` under a directory, streamed through DataLoaders.

    Particle p's order and every sample's random crop and flip come from its generator (a seed
    per position in the epoch), the same for any number of ranks and loader workers.

    The loader workers decode and crop to uint8 (a quarter of float32's bytes through shared
    and pinned memory); each batch is copied to the device as it is, then stacked over particles
    and normalised there (the same float32 values as torchvision's ``ToTensor`` + ``Normalize``)."""

    MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def __init__(self, root: Path, image_size: int, workers: int):
        from torchvision import datasets, transforms
        try:   # a class folder without images
            self.train = datasets.ImageFolder(str(root / "train"), transforms.Compose([
                transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                transforms.PILToTensor()]), loader=_load_image)
        except FileNotFoundError as error:
            raise ConfigError(f"data.path: {root / 'train'}: {error}") from error
        self.train_plain = datasets.ImageFolder(str(root / "train"), transforms.Compose([
            transforms.Resize(image_size * 8 // 7), transforms.CenterCrop(image_size),
            transforms.PILToTensor()]), loader=_load_image)
        try:
            self.test = _folder_with_classes(root / "val", self.train_plain.transform, self.train.classes)
        except FileNotFoundError as error:   # ILSVRC2012_img_val.tar unpacks flat
            raise ConfigError(f"data.path: {error} ImageFolder needs {root / 'val'}/<class>/<image>, like "
                              "train/: sort the validation images into their classes' folders (the "
                              "flat ILSVRC2012 validation archive needs its devkit labels for that)") from error
        if not self.test.samples:
            raise ConfigError(f"data.path: {root / 'val'} holds no images in its class folders: nothing to test on")
        self.num_classes = len(self.train.classes)
        self.input_shape = (3, image_size, image_size)
        self.workers = workers
        self.to("cpu")

    @property
    def num_train(self) -> int:
        return len(self.train)

    def to(self, device) -> "FolderData":
        self.device = torch.device(device)
        self._mean, self._std = (torch.tensor(v, device=self.device).view(-1, 1, 1) for v in (self.MEAN, self.STD))
        return self

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train // batch_size)

    def _on_device(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch from the loader, on the device as normalised float32."""
        x = images.to(self.device, non_blocking=True).float().div_(255)
        return x.sub_(self._mean).div_(self._std)

    def _loader(self, dataset, batch_size, sampler, drop_last=False):
        """A DataLoader over ``sampler``; its own generator (the workers' base seed, which no
        sample uses) leaves torch's global one untouched."""
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, generator=torch.Generator(),
            num_workers=self.workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False)

    def _rank_samples(self, generator: torch.Generator, batch_size: int, part: slice) -> list[tuple[int, int]]:
        """(augmentation seed, index) of this rank's part of every full batch of the particle's
        epoch: a permutation, and one seed per position in it."""
        order = torch.randperm(self.num_train, generator=generator)
        steps = self.steps_per_epoch(batch_size)
        seeds = torch.randint(2 ** 62, (steps * batch_size,), generator=generator)
        pairs = torch.stack([seeds, order[:steps * batch_size]], dim=1).view(steps, batch_size, 2)
        return [tuple(pair) for pair in pairs[:, part].reshape(-1, 2).tolist()]

    def train_batches(self, generators, batch_size: int, augment: bool = True, shard: Shard = (0, 1),
                      skip: int = 0):
        batch_size, part = _epoch_batch(batch_size, self.num_train, shard)
        dataset = _Seeded(self.train if augment else self.train_plain)
        share = part.stop - part.start
        loaders = [_from_workers(self._loader(dataset, share, self._rank_samples(g, batch_size, part)[skip * share:],
                                              drop_last=True)) for g in generators]
        for batches in zip(*loaders):   # pinned batches copied as they are, stacked on the device
            yield (torch.stack([self._on_device(x) for x, _ in batches]),
                   torch.stack([y.to(self.device, non_blocking=True) for _, y in batches]))

    def eval_batches(self, split: str, batch_size: int, shard: Shard = (0, 1)):
        dataset = self.train_plain if split == "train" else self.test
        index, count = shard
        rows = [j for start in range(index * batch_size, len(dataset), count * batch_size)
                for j in range(start, min(start + batch_size, len(dataset)))]   # only this rank's batches
        for x, y in _from_workers(self._loader(dataset, batch_size, rows)):
            yield self._on_device(x), y.to(self.device, non_blocking=True)


def _from_workers(loader) -> Iterator:
    """``loader``'s batches; a ConfigError raised in a loader worker (an unreadable image) comes
    with its own message, not the text of the worker's traceback that torch wraps it in."""
    try:
        yield from loader
    except ConfigError as error:
        last = str(error).rstrip().splitlines()[-1]
        raise ConfigError(last.partition(f"{ConfigError.__name__}: ")[2] or last) from None


def _normalised(x_train: np.ndarray, x_test: np.ndarray):
    """float32 tensors scaled by 1/255 if uint8, then normalised per channel (dim 1: the channel
    of ``[N, C, ...]``, the feature of ``[N, F]``) with train stats; and the value a black (0)
    pixel takes, per channel (for crop padding). Inputs wider than float32 (float64, int32,
    int64: timestamps, say) are normalised in float64, so an offset far above the spread keeps
    the spread's digits."""
    wide = np.result_type(x_train.dtype, np.float32) == np.float64

    def as_float(x):
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.double() if wide else x.float()
    x_train, x_test = as_float(x_train), as_float(x_test)
    dims = [0] + list(range(2, x_train.dim()))
    mean, std = x_train.mean(dims, keepdim=True), x_train.std(dims, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return ((x_train - mean) / std).float(), ((x_test - mean) / std).float(), (-mean / std).flatten().float()


_CHANNELS = (1, 3, 4)   # channel counts of images: grey, RGB, RGBA
MAX_CLASSES = 10 ** 6   # above it, a label is an ID or a value, not a class index


def _checked(source: str, x_train, y_train, x_test, y_test, classes: int | None = None, layout: str = "auto"):
    """The arrays of a user's data set, checked (ConfigError naming the array): inputs numeric,
    finite and within float32, one shape for both splits, ``[N, H, W]`` given a channel axis and
    channel-last ``[N, H, W, C]`` moved to ``[N, C, H, W]`` (``layout``: see ``_channels_first``);
    labels one non-negative integer per example, below ``classes`` if given (a data set of known
    classes). Returns them and the class count (``classes``, else the largest label + 1)."""
    native = lambda a: a.astype(a.dtype.newbyteorder("="), copy=False)   # big-endian files too
    squeezed = lambda y: y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y   # Keras's [N, 1] labels
    x_train, x_test = native(x_train), native(x_test)
    y_train, y_test = squeezed(native(y_train)), squeezed(native(y_test))
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.issubdtype(x.dtype, np.complexfloating):
            raise ConfigError(f"{source}: x_{name} has dtype {x.dtype}; inputs must be real numbers")
        if x.ndim < 2 or len(x) == 0:
            raise ConfigError(f"{source}: x_{name} has shape {x.shape}; inputs are [N, ...] with N >= 1")
        if np.issubdtype(x.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(x) | (np.abs(x) > np.finfo(np.float32).max)))
            if bad:
                raise ConfigError(f"{source}: x_{name} has {bad} NaN, infinite or beyond-float32 values")
        if y.ndim != 1 or len(y) != len(x):
            raise ConfigError(f"{source}: y_{name} has shape {y.shape}; labels are one class index per "
                              f"example of x_{name} ({len(x)} of them), not one-hot")
        integral = np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_ or (
            np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all() and (y == np.round(y)).all())
        if not integral or (y < 0).any():
            shown = y[(y < 0) | (y != np.round(y)) | ~np.isfinite(y)] if np.issubdtype(y.dtype, np.number) \
                else y   # the bad ones
            raise ConfigError(f"{source}: y_{name} must hold class indices 0, 1, ..., K-1 as integers "
                              f"(dtype {y.dtype}, values such as {shown[:3].tolist()})")
        if classes is not None and len(y) and y.max() >= classes:
            raise ConfigError(f"{source}: y_{name} holds labels beyond the {classes} classes 0..{classes - 1} "
                              f"(such as {y[y >= classes][:3].tolist()})")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ConfigError(f"{source}: x_train examples have shape {x_train.shape[1:]} but x_test's have "
                          f"{x_test.shape[1:]}")
    x_train, x_test = _channels_first(source, x_train, x_test, layout)
    if classes is None:
        largest = max(y_train.max(), y_test.max())
        if largest >= MAX_CLASSES:
            raise ConfigError(f"{source}: the largest label is {largest}, so the model would have {largest} + 1 "
                              f"outputs; labels must be class indices 0, 1, ..., K-1 (K below {MAX_CLASSES:,})")
        classes = int(largest) + 1
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes


def _channels_first(source: str, x_train, x_test, layout: str):
    """``x_train`` and ``x_test`` with images as ``[N, C, H, W]``: ``[N, H, W]`` gets a channel
    axis; a 4-D array is channels last where ``layout`` (data.layout) says so, or, for ``auto``,
    where its last axis holds 1, 3 or 4 channels (grey, RGB, RGBA) and its second does not. A
    square ``[N, H, H, C]`` of fewer other channels is refused as unclear; other arrays are kept."""
    shape = x_train.shape
    if layout != "auto" and len(shape) != 4:
        raise ConfigError(f"{source}: data.layout {layout} is for 4-D images, but x_train has shape {shape}; "
                          "leave data.layout auto")
    if len(shape) == 3:
        return x_train[:, None], x_test[:, None]
    if len(shape) != 4:
        return x_train, x_test
    first, middle, last = shape[1:]
    if layout == "auto" and first == middle and last < first and first not in _CHANNELS and last not in _CHANNELS:
        raise ConfigError(f"{source}: x_train has shape {shape}, whose channel axis is not clear: set data.layout "
                          f"to channels_last ([N, H, W, C]: {last} channels) or channels_first ([N, C, H, W]: "
                          f"{first} channels)")
    if layout == "channels_last" or (layout == "auto" and last in _CHANNELS and first not in _CHANNELS):
        return x_train.transpose(0, 3, 1, 2), x_test.transpose(0, 3, 1, 2)
    return x_train, x_test


def _digits() -> TensorData:
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = x.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0
    order = np.random.RandomState(0).permutation(len(y))   # fixed split, independent of the run seed
    test, train = order[:360], order[360:]
    x_train, x_test, _ = _normalised(x[train], x[test])
    return TensorData(x_train, torch.from_numpy(y[train]), x_test, torch.from_numpy(y[test]), 10)


_NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _npz_arrays(path: Path, only_shape: Sequence[str] = ()) -> list[np.ndarray]:
    """x_train, y_train, x_test, y_test of the .npz at ``path`` (ConfigError naming what is wrong);
    those named in ``only_shape`` are read from their header alone, as zero-stride uint8 views
    of their shape that take no memory (read whole where their header cannot be read alone)."""
    try:
        arrays = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ConfigError(f"data.path {str(path)!r} is not a readable .npz file ({error})") from error
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ConfigError(f"data.path {str(path)!r} holds one array, not an .npz of x_train, y_train, x_test, y_test")
    with arrays:
        missing = [k for k in _NPZ_ARRAYS if k not in arrays]
        if missing:
            raise ConfigError(f"data.path {str(path)!r}: the npz lacks arrays {', '.join(missing)} "
                              "(it needs x_train, y_train, x_test, y_test)")
        loaded, members = [], arrays.zip.namelist()
        for name in _NPZ_ARRAYS:
            try:
                member = name if name in members else f"{name}.npy"   # as numpy finds it
                shape = _npy_shape(arrays.zip, member) if name in only_shape else None
                loaded.append(arrays[name] if shape is None else np.broadcast_to(np.uint8(0), shape))
            except ValueError as error:   # object arrays need pickle, which loading user files must not run
                raise ConfigError(f"data.path {str(path)!r}: {name}: {error}") from error
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:   # a damaged member
                raise ConfigError(f"data.path {str(path)!r} is damaged: {name} ({error})") from error
            if not isinstance(loaded[-1], np.ndarray):   # numpy hands over a member that is no .npy as bytes
                raise ConfigError(f"data.path {str(path)!r}: {name} is no .npy array")
    return loaded


def _npy_shape(archive: zipfile.ZipFile, member: str) -> tuple[int, ...] | None:
    """The shape in the header of the .npy ``member`` of ``archive``, its data left unread; None
    for a header version other than 1.0 and 2.0 (numpy has no public reader of the others) or
    none at all (reading the member whole names the problem)."""
    with archive.open(member) as file:
        try:
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(file))
            return None if read is None else read(file)[0]
        except ValueError:
            return None


def _npz(path: Path, layout: str = "auto") -> TensorData:
    """The user's arrays in the .npz at ``path``; ``layout``: data.layout (see ``_channels_first``)."""
    x_train, y_train, x_test, y_test, classes = _checked(f"data.path {str(path)!r}", *_npz_arrays(path),
                                                         layout=layout)
    x_train, x_test, _ = _normalised(x_train, x_test)
    return TensorData(x_train, torch.from_numpy(y_train), x_test, torch.from_numpy(y_test), classes)


def _npz_spec(path: Path, layout: str = "auto") -> tuple[list[int], int]:
    """(input shape, classes) of :func:`_npz` ``(path, layout)`` from the inputs' headers and the
    labels: the inputs are neither read nor checked (loading them does)."""
    x_train, _, _, _, classes = _checked(f"data.path {str(path)!r}",
                                         *_npz_arrays(path, only_shape=("x_train", "x_test")), layout=layout)
    return list(x_train.shape[1:]), classes


_IDX = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _read_idx(path: Path) -> np.ndarray:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError, zlib.error) as error:   # a truncated download, an HTML page saved as .gz
        raise ConfigError(f"{path} cannot be read ({error}): a truncated or failed download?") from error
    if raw[:2] == b"\x1f\x8b":
        raise ConfigError(f"{path} is gzip-compressed: name it {path.name}.gz or decompress it")
    try:
        ndim = raw[3]
        shape = np.frombuffer(raw, ">i4", ndim, 4)
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    except (IndexError, ValueError) as error:
        raise ConfigError(f"{path} is not a complete idx file ({error})") from error


def _mnist(root: Path, folder: str) -> TensorData:
    candidates = [root, root / folder / "raw", root / "raw"]
    for directory in candidates:
        files = {k: next((p for p in (directory / n, directory / f"{n}.gz") if p.is_file()), None)
                 for k, n in _IDX.items()}
        if all(files.values()):
            break
    else:
        raise ConfigError(f"data.path {str(root)!r}: no {folder} idx files found; put "
                          f"{', '.join(n + '[.gz]' for n in _IDX.values())} either directly in it "
                          f"or in {root / folder / 'raw'} (torchvision's layout)")
    arrays = {k: _read_idx(p) for k, p in files.items()}
    x_train, y_train, x_test, y_test, classes = _checked(
        f"data.path {str(root)!r}", arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], 10)
    x_train, x_test, _ = _normalised(x_train, x_test)
    return TensorData(x_train, torch.from_numpy(y_train), x_test, torch.from_numpy(y_test), classes)   # no augmentation (OpenLTH)


def _cifar(root: Path, classes: int, augment: bool) -> TensorData:
    """torchvision's CIFAR files, normalised per channel with the training set's statistics
    (OpenLTH uses ImageNet's constants: another affine map of the input, which the first
    BatchNorm all but undoes)."""
    folder, train_files, label_key = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "labels") if classes == 10
        else ("cifar-100-python", ["train"], "fine_labels"))
    test_file = "test_batch" if classes == 10 else "test"
    directory = root / folder if (root / folder).is_dir() else root
    needed = [*train_files, test_file]
    if not all((directory / f).is_file() for f in needed):
        raise ConfigError(f"data.path {str(root)!r}: expected torchvision's CIFAR-{classes} files "
                          f"{', '.join(needed)} in {root / folder} (extract the python-version "
                          "archive there)")

    def field(part: dict, key: str, name: str):
        """``part[key]``, whether the batch was pickled by Python 2 (as distributed) or 3."""
        value = part.get(key, part.get(key.encode()))
        if value is None:
            raise ConfigError(f"{directory / name} holds no {key!r} entry: not a CIFAR-{classes} batch")
        return value

    def batch(name: str) -> dict:
        try:
            with open(directory / name, "rb") as file:
                part = pickle.load(file, encoding="latin1")   # as torchvision reads them
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            raise ConfigError(f"{directory / name} cannot be read ({error}): a truncated or failed "
                              "download?") from error
        if not isinstance(part, dict):
            raise ConfigError(f"{directory / name} holds a {type(part).__name__}, not a CIFAR-{classes} batch")
        return part

    def read(names):
        parts = {name: batch(name) for name in names}
        images, labels = [], []
        for name, part in parts.items():
            try:
                data = np.asarray(field(part, "data", name), dtype=np.uint8)
            except (ValueError, TypeError, OverflowError) as error:
                raise ConfigError(f"{directory / name}: its data is not uint8 images ({error})") from error
            if data.ndim != 2 or data.shape[1] != 3072:
                raise ConfigError(f"{directory / name}: its data has shape {data.shape}, not [N, 3072] (32x32 RGB)")
            labels.append(np.asarray(field(part, label_key, name)))
            if labels[-1].shape != (len(data),):
                raise ConfigError(f"{directory / name}: {label_key} has shape {labels[-1].shape} for its "
                                  f"{len(data)} images")
            images.append(data.reshape(-1, 3, 32, 32))
        return np.concatenate(images), np.concatenate(labels)
    (x_train, y_train), (x_test, y_test) = read(train_files), read([test_file])
    x_train, y_train, x_test, y_test, classes = _checked(str(directory), x_train, y_train, x_test, y_test, classes)
    x_train, x_test, black = _normalised(x_train, x_test)
    return TensorData(x_train, torch.from_numpy(y_train), x_test, torch.from_numpy(y_test), classes,
                      crop_padding=4 if augment else 0, flip=augment, pad_value=black)   # black padding


def _synthetic(config: DataConfig) -> TensorData:
    """Gaussian inputs with random labels: at most SYNTHETIC_POOL distinct training inputs."""
    g = torch.Generator().manual_seed(0)
    y_train = torch.randint(0, config.classes, (config.train_size,), generator=g)
    y_test = torch.randint(0, config.classes, (config.test_size,), generator=g)
    x_train = torch.randn(min(config.train_size, SYNTHETIC_POOL), *config.shape, generator=g)
    x_test = torch.randn(config.test_size, *config.shape, generator=g)
    return TensorData(x_train, y_train, x_test, y_test, config.classes)


_SHAPES = {"digits": ([1, 8, 8], 10), "mnist": ([1, 28, 28], 10), "fashion_mnist": ([1, 28, 28], 10),
           "cifar10": ([3, 32, 32], 10), "cifar100": ([3, 32, 32], 100)}


def input_spec(config: DataConfig) -> tuple[list[int], int]:
    """(input shape, classes) of the dataset ``config`` names without loading its images (npz:
    the inputs' headers and the labels; imagenet: ``image_size`` and the class folders of ``train/``)."""
    if config.name == "synthetic":
        return list(config.shape), config.classes
    if config.name == "imagenet":
        train = Path(config.path) / "train"
        if not train.is_dir():
            raise ConfigError(f"data.path {config.path!r}: no ImageFolder {train} to count the classes of")
        return [3, config.image_size, config.image_size], sum(entry.is_dir() for entry in os.scandir(train))
    if config.name == "npz":
        return _npz_spec(Path(config.path), config.layout)
    return _SHAPES[config.name]


def load_data(config: DataConfig):
    """The dataset ``config`` names, on the CPU. Nothing is downloaded."""
    name, root = config.name, Path(config.path)
    if name in ("npz", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet") and not root.exists():
        raise ConfigError(f"data.path {config.path!r} does not exist; the README's data section says "
                          f"what dataset {name} expects there")
    if name == "digits":
        return _digits()
    if name == "synthetic":
        return _synthetic(config)
    if name == "npz":
        return _npz(root, config.layout)
    if name in ("mnist", "fashion_mnist"):
        return _mnist(root, "MNIST" if name == "mnist" else "FashionMNIST")
    if name in ("cifar10", "cifar100"):
        return _cifar(root, 10 if name == "cifar10" else 100, config.augment)
    if name == "imagenet":
        if not (root / "train").is_dir() or not (root / "val").is_dir():
            raise ConfigError(f"data.path {config.path!r}: put ImageNet as ImageFolder directories "
                              f"{root / 'train'}/<class>/*.JPEG and {root / 'val'}/<class>/*.JPEG")
        return FolderData(root, config.image_size, config.workers)
    raise ConfigError(f"data.name {name!r} is unknown")
