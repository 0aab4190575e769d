"""swamp.data: loaders for every on-disk format (written by the tests), device batching, augmentation."""
import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from swamp.config import ConfigError, DataConfig
from swamp.data import TensorData, epoch_generator, input_spec, load_data


def test_digits_is_embedded_and_normalised():
    data = load_data(DataConfig(name="digits"))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.num_train == 1797 - 360 and len(data.y_test) == 360
    assert abs(data.x_train.mean().item()) < 1e-4


def test_npz_any_shape_uint8(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.integers(0, 256, (40, 2, 5, 5), dtype=np.uint8), y_train=rng.integers(0, 3, 40),
             x_test=rng.integers(0, 256, (10, 2, 5, 5), dtype=np.uint8), y_test=np.array([4] + [0] * 9))
    data = load_data(DataConfig(name="npz", path=str(path)))
    assert data.input_shape == (2, 5, 5) and data.num_classes == 5 and data.x_train.dtype == torch.float32
    assert torch.allclose(data.x_train.mean((0, 2, 3)), torch.zeros(2), atol=1e-5)
    np.savez(path, x_train=np.zeros((4, 3)), y_train=np.zeros(4))
    with pytest.raises(ConfigError, match="x_test, y_test"):
        load_data(DataConfig(name="npz", path=str(path)))


def write_npz(path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return DataConfig(name="npz", path=str(path))


def test_npz_image_layouts_and_features_are_normalised_per_channel(tmp_path):
    rng = np.random.default_rng(5)
    hwc = rng.integers(0, 256, (30, 6, 7, 3), dtype=np.uint8) * np.array([0, 1, 2], dtype=np.uint8) // 2
    data = load_data(write_npz(tmp_path / "hwc.npz", hwc, rng.integers(0, 2, 30), hwc[:5], np.zeros(5)))
    assert data.input_shape == (3, 6, 7)   # channel-last images moved to [C, H, W]
    assert not data.x_train[:, 0].any()    # the all-zero channel stays one channel
    assert torch.allclose(data.x_train.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.x_train[:, 1:].std((0, 2, 3)), torch.ones(2), atol=1e-5)
    grey = rng.random((30, 6, 7), dtype=np.float32)
    assert load_data(write_npz(tmp_path / "g.npz", grey, np.arange(30) % 2, grey[:4], np.zeros(4))).input_shape \
        == (1, 6, 7)
    features = rng.random((30, 4)) * np.array([1, 10, 100, 1000])   # float64, very different scales
    data = load_data(write_npz(tmp_path / "f.npz", features, np.arange(30) % 2, features[:4], np.ones(4)))
    assert torch.allclose(data.x_train.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(data.x_train.std(0), torch.ones(4), atol=1e-5)   # per feature, not overall
    assert data.y_train.dtype == torch.int64 and data.num_classes == 2


@pytest.mark.parametrize("change, message", [
    ({"y_train": np.zeros(19)}, r"y_train has shape \(19,\); labels are one class index per example of "
                                r"x_train \(20 of them\)"),
    ({"y_train": np.eye(3)[np.arange(20) % 3]}, r"y_train has shape \(20, 3\).*not one-hot"),
    ({"y_test": np.array(["cat"] * 5)}, r"y_test must hold class indices 0, 1, ..., K-1 as integers"),
    ({"y_train": np.arange(20) - 1}, "y_train must hold class indices"),
    ({"y_train": np.linspace(0, 2, 20)}, "y_train must hold class indices"),
    ({"x_test": np.zeros((5, 7))}, r"x_train examples have shape \(6,\) but x_test's have \(7,\)"),
    ({"x_train": np.full((20, 6), np.nan)}, "x_train has 120 NaN, infinite or beyond-float32 values"),
    ({"x_train": np.full((20, 6), 1e39)}, "x_train has 120 NaN, infinite or beyond-float32 values"),
    ({"x_test": np.zeros((0, 6)), "y_test": np.zeros(0)}, r"x_test has shape \(0, 6\); inputs are \[N, ...\] "
                                                          "with N >= 1"),
    ({"x_train": np.array([[object()]] * 20)}, "x_train: Object arrays cannot be loaded"),
    ({"y_test": np.array([10 ** 10] * 5)}, r"the largest label is 10000000000, so the model would have"),
    ({"y_test": np.array([2 ** 63] * 5, dtype=np.uint64)}, r"the largest label is 9223372036854775808"),
])
def test_npz_that_cannot_be_right_is_refused_naming_the_array(tmp_path, change, message):
    arrays = {"x_train": np.zeros((20, 6)), "y_train": np.arange(20) % 3, "x_test": np.zeros((5, 6)),
              "y_test": np.arange(5) % 3, **change}
    with pytest.raises(ConfigError, match=message):
        load_data(write_npz(tmp_path / "bad.npz", **arrays))


def test_npz_of_other_conventions_loads_and_ambiguous_or_damaged_ones_are_refused(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.random((8, 5, 5, 3)).astype(">f4")   # big-endian, channels last
    data = load_data(write_npz(tmp_path / "be.npz", x, (np.arange(8) % 2)[:, None], x[:3], np.zeros((3, 1))))
    assert data.input_shape == (3, 5, 5) and data.y_train.tolist() == [0, 1] * 4   # Keras's [N, 1] labels
    with pytest.raises(ConfigError, match=r"values such as \[inf\]"):
        load_data(write_npz(tmp_path / "inf.npz", np.zeros((2, 2)), np.array([0.0, np.inf]), np.zeros((1, 2)),
                            np.zeros(1)))
    with pytest.raises(ConfigError, match=r"values such as \[-1, -3\]"):
        load_data(write_npz(tmp_path / "neg.npz", np.zeros((4, 2)), np.array([0, -1, 2, -3]), np.zeros((1, 2)),
                            np.zeros(1)))
    cut = tmp_path / "cut.npz"
    cut.write_bytes((tmp_path / "be.npz").read_bytes()[:500])
    with pytest.raises(ConfigError, match=r"cut.npz' is (not a readable .npz file|damaged)"):
        load_data(DataConfig(name="npz", path=str(cut)))


def test_npz_input_spec_reads_the_inputs_headers_only(tmp_path):
    """The shape comes from x_train's .npy header: input_spec succeeds where reading x_train's data
    fails (a flipped byte past its header: a CRC error), and agrees with the loaded arrays."""
    x = np.random.default_rng(8).integers(0, 256, (64, 5, 600, 3), dtype=np.uint8)   # reads go by 4 KiB
    config = write_npz(tmp_path / "x.npz", x, np.arange(64) % 4, x[:4], np.full(4, 6))
    assert input_spec(config) == ([3, 5, 600], 7) and load_data(config).input_shape == (3, 5, 600)
    with zipfile.ZipFile(config.path) as archive:
        member = archive.getinfo("x_train.npy")
    raw = bytearray(Path(config.path).read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
    raw[member.header_offset + 30 + name_length + extra_length + 128 + 500_000] ^= 0xFF   # the .npy header is 128 bytes
    Path(config.path).write_bytes(raw)
    assert input_spec(config) == ([3, 5, 600], 7)
    with pytest.raises(ConfigError, match="x.npz' is damaged: x_train"):
        load_data(config)
    with zipfile.ZipFile(config.path, "w") as archive:   # a .npy header of version 3.0: x read whole
        for name, array in (("x_train", x), ("y_train", np.arange(64) % 4), ("x_test", x[:4]), ("y_test", np.ones(4))):
            with archive.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, array, version=(3, 0))
    assert input_spec(config) == ([3, 5, 600], 4)


@pytest.mark.parametrize("suffix, broken", [("", None), (".npy", "x_train"), (".npy", "y_test"), ("", "x_test")])
def test_npz_members_numpy_reads_are_read_and_others_named(tmp_path, suffix, broken):
    """Members named without .npy load as numpy loads them; a member that is no .npy file is named
    by input_spec and load_data alike (numpy hands it over as bytes)."""
    x = np.random.default_rng(9).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for name, array in (("x_train", x), ("y_train", np.arange(10) % 5), ("x_test", x[:2]), ("y_test", np.ones(2))):
            with archive.open(name + suffix, "w") as member:
                member.write(b"no array") if name == broken else np.lib.format.write_array(member, array)
    config = DataConfig(name="npz", path=str(path))
    if broken is None:
        assert input_spec(config) == ([3, 8, 8], 5) and load_data(config).input_shape == (3, 8, 8)
        return
    for read in (input_spec, load_data):
        with pytest.raises(ConfigError, match=f"odd.npz': {broken} is no .npy array"):
            read(config)


@pytest.mark.parametrize("shape, layout, expected", [   # auto: the rule runs started before data.layout read by
    ((8, 5, 4, 3), "auto", (3, 5, 4)),        # RGB last
    ((8, 64, 7, 7), "auto", (64, 7, 7)),      # 64 channels first
    ((8, 1, 5, 4), "auto", (1, 5, 4)),        # grey first: the second axis holds a channel count
    ((8, 6, 5, 2), "auto", (6, 5, 2)),        # no channel count: first
    ((8, 6, 6, 2), "auto", r"\(8, 6, 6, 2\), whose channel axis is not clear: set data.layout to channels_last "
                           r"\(\[N, H, W, C\]: 2 channels\) or channels_first \(\[N, C, H, W\]: 6 channels\)"),
    ((8, 6, 6, 8), "auto", (6, 6, 8)),
    ((8, 6, 6, 2), "channels_last", (2, 6, 6)),
    ((8, 6, 5, 2), "channels_last", (2, 6, 5)),
    ((8, 1, 5, 4), "channels_last", (4, 1, 5)),
    ((8, 5, 4, 3), "channels_first", (5, 4, 3)),   # the user's word, against the guess
    ((8, 5, 5), "channels_last", r"data.layout channels_last is for 4-D images, but x_train has shape "
                                 r"\(8, 5, 5\); leave data.layout auto"),
    ((8, 6), "channels_first", r"is for 4-D images"),
])
def test_npz_channel_axis_comes_from_data_layout_or_the_shape(tmp_path, shape, layout, expected):
    x = np.random.default_rng(7).random(shape)
    config = write_npz(tmp_path / "x.npz", x, np.arange(8) % 2, x[:2], np.zeros(2))
    config.layout = layout
    if isinstance(expected, str):
        with pytest.raises(ConfigError, match=expected):
            input_spec(config)
        return
    data = load_data(config)
    assert data.input_shape == expected and input_spec(config) == (list(expected), 2)
    moved = np.moveaxis(x, -1, 1) if data.input_shape != shape[1:] else x
    assert torch.equal(data.x_train.argsort(0), torch.from_numpy(moved.argsort(0)))   # the same values, moved


@pytest.mark.parametrize("offset, dtype", [(1e9, np.float64), (1.7e12, np.int64)])
def test_npz_inputs_wider_than_float32_keep_their_spread(tmp_path, offset, dtype):
    rng = np.random.default_rng(6)
    spread = rng.permutation(10 ** 5)[:200].reshape(100, 2)   # distinct; timestamps, say: an offset far above
    x = (offset + spread).astype(dtype)
    data = load_data(write_npz(tmp_path / "t.npz", x, np.zeros(100), x[:10], np.zeros(10)))
    expected = (x - x.mean(0)) / x.std(0, ddof=1)
    assert data.x_train.dtype == torch.float32 and len(data.x_train[:, 0].unique()) == 100
    np.testing.assert_allclose(data.x_train.numpy(), expected, atol=1e-5)


def test_npz_labels_may_be_whole_floats_or_bools(tmp_path):
    x = np.zeros((6, 2))
    data = load_data(write_npz(tmp_path / "a.npz", x, np.array([0.0, 1.0, 2.0] * 2), x, np.array([True, False] * 3)))
    assert data.y_train.tolist() == [0, 1, 2] * 2 and data.y_test.tolist() == [1, 0] * 3 and data.num_classes == 3


def write_cifar10(root, n_per_batch=6, key=lambda name: name.encode()):
    """torchvision's CIFAR-10 files; keys bytes as in the Python 2 pickles distributed (``key=str``:
    as Python 3 writes a batch it re-pickles)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {key("data"): rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 key("labels"): list(rng.integers(0, 10, n_per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_torchvision_layout(tmp_path):
    write_cifar10(tmp_path)
    data = load_data(DataConfig(name="cifar10", path=str(tmp_path)))
    assert data.x_train.shape == (30, 3, 32, 32) and data.x_test.shape == (6, 3, 32, 32)
    assert data.num_classes == 10 and data.crop_padding == 4 and data.flip
    plain = load_data(DataConfig(name="cifar10", path=str(tmp_path), augment=False))
    assert plain.crop_padding == 0 and not plain.flip
    # padding is black: per channel the normalisation is affine in the raw value, so extrapolate it to 0
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = torch.from_numpy(pickle.load(f)[b"data"][0].reshape(3, -1).astype(np.float32))
    normalised = data.x_train[0].reshape(3, -1)
    a, b = raw.argmin(1), raw.argmax(1)
    pick = lambda t, i: t.gather(1, i[:, None])[:, 0]
    slope = (pick(normalised, b) - pick(normalised, a)) / (pick(raw, b) - pick(raw, a))
    torch.testing.assert_close(data.pad_value.flatten(), pick(normalised, a) - slope * pick(raw, a))


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_idx_files(tmp_path, layout):
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(12) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    data = load_data(DataConfig(name="fashion_mnist", path=str(tmp_path)))
    assert data.x_train.shape == (12, 1, 28, 28) and data.y_train.tolist() == [i % 10 for i in range(12)]
    assert data.crop_padding == 0 and not data.flip   # no augmentation for MNIST, as OpenLTH
    assert data.y_test.tolist() == list(range(5))


def test_cifar10_batches_pickled_by_python_3_load_alike_and_damaged_ones_are_named(tmp_path):
    write_cifar10(tmp_path / "py2")
    write_cifar10(tmp_path / "py3", key=str)
    a, b = (load_data(DataConfig(name="cifar10", path=str(tmp_path / d))) for d in ("py2", "py3"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    batch = tmp_path / "py3" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])   # an interrupted copy
    with pytest.raises(ConfigError, match=r"data_batch_3 cannot be read \(.*\): a truncated or failed download"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path / "py3")))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b.update(labels=b["labels"] + [0, 1]), r"data_batch_2: labels has shape \(8,\) for its 6 images"),
    (lambda b: b.update(data=b["data"].reshape(12, 1536)), r"data_batch_2: its data has shape \(12, 1536\), not "
                                                           r"\[N, 3072\]"),
    (lambda b: b.update(labels=[10] + b["labels"][1:]), r"y_train holds labels beyond the 10 classes 0..9 \(such as "
                                                        r"\[10\]\)"),
    (lambda b: b.update(labels=[-1] + b["labels"][1:]), r"y_train must hold class indices"),
])
def test_cifar10_batches_that_cannot_be_right_are_refused(tmp_path, damage, message):
    write_cifar10(tmp_path, key=str)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes())
    batch["labels"] = [int(label) for label in batch["labels"]]
    damage(batch)
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(ConfigError, match=message):
        load_data(DataConfig(name="cifar10", path=str(tmp_path)))


def test_idx_files_that_cannot_be_read_are_named(tmp_path):
    rng = np.random.default_rng(2)
    for name, array in (("train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28))),
                        ("train-labels-idx1-ubyte.gz", np.arange(12) % 10),
                        ("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28))),
                        ("t10k-labels-idx1-ubyte", np.arange(5))):
        write_idx(tmp_path / name, array)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:300])   # an interrupted download
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte.gz cannot be read \(.*\): a truncated"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    images.write_bytes(b"<html>Not Found</html>")   # a web page saved under the name
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte.gz cannot be read"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    write_idx(images, rng.integers(0, 256, (12, 28, 28)))
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(gzip.compress(labels.read_bytes()))   # compressed, named without .gz
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte is gzip-compressed: name it "
                                          r"t10k-labels-idx1-ubyte.gz or decompress it"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))


def test_idx_files_that_disagree_or_are_cut_short_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10) % 10)   # 10 labels for 12 images
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    with pytest.raises(ConfigError, match=r"y_train has shape \(10,\); labels are one class index per example "
                                          r"of x_train \(12 of them\)"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 11)   # a label 10
    with pytest.raises(ConfigError, match=r"y_train holds labels beyond the 10 classes 0..9 \(such as \[10\]\)"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([5, 28, 28], ">i4").tobytes() + bytes(100))
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte.gz is not a complete idx file"):
        load_data(DataConfig(name="mnist", path=str(tmp_path)))


def test_missing_files_say_what_goes_where(tmp_path):
    with pytest.raises(ConfigError, match="train-images-idx3-ubyte.*FashionMNIST"):
        load_data(DataConfig(name="fashion_mnist", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="data_batch_1.*cifar-10-batches-py"):
        load_data(DataConfig(name="cifar10", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="train.*val"):
        load_data(DataConfig(name="imagenet", path=str(tmp_path)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_data(DataConfig(name="cifar100", path=str(tmp_path / "nowhere")))


def test_image_folder(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(3)
    for split in ("train", "val"):
        for label in ("ant", "bee"):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / split / label / f"{i}.png")
    data = load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=16, workers=0))
    assert data.num_classes == 2 and data.input_shape == (3, 16, 16) and data.num_train == 6
    batches = list(data.train_batches([epoch_generator(0, 0, p, 0) for p in range(2)], 3))
    assert len(batches) == 2 and batches[0][0].shape == (2, 3, 3, 16, 16) and batches[0][1].shape == (2, 3)
    x, y = next(data.eval_batches("test", 4))
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 0, 1]
    # workers hand over uint8; the device-side normalisation equals torchvision's float pipeline
    from torchvision import datasets, transforms
    reference = datasets.ImageFolder(str(tmp_path / "val"), transforms.Compose([
        transforms.Resize(18), transforms.CenterCrop(16), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
    assert torch.equal(x, torch.stack([reference[i][0] for i in range(4)]))
    whole = [y.tolist() for _, y in data.eval_batches("train", 2)]
    shards = [[y.tolist() for _, y in data.eval_batches("train", 2, shard=(i, 2))] for i in range(2)]
    assert shards == [whole[0::2], whole[1::2]]
    generators = lambda: [epoch_generator(0, 0, p, 0) for p in range(2)]
    full = [x for x, _ in data.train_batches(generators(), 4, augment=False)]
    halves = [[x for x, _ in data.train_batches(generators(), 4, augment=False, shard=(i, 2))] for i in range(2)]
    assert len(full) == len(halves[0]) == 1
    assert torch.equal(torch.cat([halves[0][0], halves[1][0]], dim=1), full[0])


def test_image_folder_val_takes_the_train_class_numbers(tmp_path):
    """A val/ lacking a class (a subset) keeps train's numbering; a class train/ lacks is refused."""
    from PIL import Image
    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    for split, labels in (("train", ("a_cat", "b_dog", "c_fox")), ("val", ("a_cat", "c_fox"))):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            image.save(tmp_path / split / label / "0.png")
    data = load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=8, workers=0))
    assert data.num_classes == 3 and [y.tolist() for _, y in data.eval_batches("test", 4)] == [[0, 2]]
    (tmp_path / "val" / "d_emu").mkdir()
    image.save(tmp_path / "val" / "d_emu" / "0.png")
    with pytest.raises(ConfigError, match="val has class folders that train/ lacks: d_emu"):
        load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=8, workers=0))


def test_image_folders_that_cannot_be_used_are_named(tmp_path):
    from PIL import Image
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
    config = DataConfig(name="imagenet", path=str(tmp_path), image_size=8, workers=0)
    with pytest.raises(ConfigError, match=rf"data.path: {tmp_path / 'train'}: Found no valid file for the classes a, b"):
        load_data(config)
    for label in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / label / "0.png")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'val'} holds no images in its class folders"):
        load_data(config)   # an evaluation would report nan
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / "b" / "0.png")
    data = load_data(config)
    copy = pickle.loads(pickle.dumps(data.test))   # as loader workers started by spawn or forkserver get it
    assert copy.samples == data.test.samples == [(str(tmp_path / "val" / "b" / "0.png"), 1)]
    truncated = tmp_path / "train" / "a" / "0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])   # an interrupted copy
    for workers in (0, 1):   # in a loader worker too: the message alone, not the worker's traceback
        data.workers = workers
        with pytest.raises(ConfigError, match=rf"^data.path: {truncated} is not a readable image \(") as raised:
            list(data.eval_batches("train", 2))
        assert "Traceback" not in str(raised.value)


def test_a_flat_val_folder_says_how_image_folder_wants_it(tmp_path):
    from PIL import Image
    for folder in ("train/n01440764", "val"):   # val/ as the ILSVRC2012 validation archive unpacks
        (tmp_path / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / folder / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ConfigError, match=r"ImageFolder needs .*val/<class>/<image>, like train/"):
        load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=8, workers=0))
    assert input_spec(DataConfig(name="imagenet", path=str(tmp_path), image_size=8)) == ([3, 8, 8], 1)
    with pytest.raises(ConfigError, match=r"no ImageFolder .*gone/train to count the classes of"):
        input_spec(DataConfig(name="imagenet", path=str(tmp_path / "gone"), image_size=8))


def test_image_folder_augmentation_follows_the_particle_seed(tmp_path):
    """A sample's crop and flip depend on the particle's generator and its position only: not on
    the loader workers, the rank count or torch's global generator (which is left untouched)."""
    from PIL import Image
    rng = np.random.default_rng(4)
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(tmp_path / split / "c" / f"{i}.png")

    def epoch(particle: int, workers: int, shard=(0, 1)):
        data = load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=12, workers=workers))
        return [x for x, _ in data.train_batches([epoch_generator(0, 0, particle, 0)], 4, shard=shard)]

    before = torch.get_rng_state()
    reference = epoch(0, workers=0)
    assert torch.equal(torch.get_rng_state(), before)
    two_ranks = [torch.cat(pair, dim=1) for pair in zip(epoch(0, 0, (0, 2)), epoch(0, 2, (1, 2)))]
    for other in (epoch(0, workers=2), two_ranks):
        assert len(other) == len(reference) == 2
        assert all(torch.equal(a, b) for a, b in zip(reference, other))
    assert not any(torch.equal(a, b) for a, b in zip(reference, epoch(1, workers=0)))
    data = load_data(DataConfig(name="imagenet", path=str(tmp_path), image_size=12, workers=0))
    skipped = [x for x, _ in data.train_batches([epoch_generator(0, 0, 0, 0)], 4, skip=1)]   # the rewind point
    assert len(skipped) == 1 and torch.equal(skipped[0], reference[1])


def test_skipped_batches_leave_the_rest_of_the_epoch_as_it_was():
    data = indexed_data(n=40, crop_padding=2)
    generators = lambda: [epoch_generator(0, 3, p, 1) for p in range(2)]
    full = list(data.train_batches(generators(), 8, shard=(1, 2)))
    tail = list(data.train_batches(generators(), 8, shard=(1, 2), skip=3))
    assert len(full) == 5 and len(tail) == 2
    assert all(torch.equal(a, b) for pair in zip(full[3:], tail) for a, b in zip(*pair))


def test_a_training_set_smaller_than_a_batch_is_one_batch():
    data = indexed_data(n=10, crop_padding=0)
    (x, _), = data.train_batches([epoch_generator(0, 0, 0, 0)], 64, shard=(1, 2))
    assert x.shape[1] == 5
    with pytest.raises(ValueError, match="training set of 10 examples, smaller than train.batch_size"):
        next(data.train_batches([epoch_generator(0, 0, 0, 0)], 64, shard=(0, 4)))
    with pytest.raises(ValueError, match="train.batch_size 6 does not split over 4"):
        next(data.train_batches([epoch_generator(0, 0, 0, 0)], 6, shard=(0, 4)))


def test_data_parallel_shards_split_every_batch_whatever_the_rank_count():
    data = indexed_data(n=48, crop_padding=0)
    generators = lambda: [epoch_generator(0, 3, p, 1) for p in range(2)]
    whole = [x for x, _ in data.train_batches(generators(), 12)]
    for count in (2, 3, 4):
        parts = [[x for x, _ in data.train_batches(generators(), 12, shard=(i, count))] for i in range(count)]
        for step, batch in enumerate(whole):
            assert torch.equal(torch.cat([p[step] for p in parts], dim=1), batch)
    with pytest.raises(ValueError, match="multiple of 5"):
        next(data.train_batches(generators(), 12, shard=(0, 5)))
    tests = [x for x, _ in data.eval_batches("train", 10)]
    shards = [[x for x, _ in data.eval_batches("train", 10, shard=(i, 2))] for i in range(2)]
    assert [t.flatten().tolist() for t in tests[0::2]] == [t.flatten().tolist() for t in shards[0]]
    assert [t.flatten().tolist() for t in tests[1::2]] == [t.flatten().tolist() for t in shards[1]]


def test_synthetic_inputs_repeat_a_bounded_pool():
    from swamp.data import SYNTHETIC_POOL
    data = load_data(DataConfig(name="synthetic", shape=[2, 3], classes=4, train_size=SYNTHETIC_POOL + 40,
                                test_size=8))
    assert data.num_train == SYNTHETIC_POOL + 40 and len(data.x_train) == SYNTHETIC_POOL
    rows = [x for x, _ in data.eval_batches("train", SYNTHETIC_POOL)]
    assert torch.equal(rows[1], data.x_train[:40])


def indexed_data(n=50, **kwargs):
    """Each sample's single pixel value is its index, so batches reveal the order."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    return TensorData(x, torch.zeros(n), x[:5], torch.zeros(5), 2, **kwargs)


def orders(data, seeds, batch=10):
    return [torch.cat([xb[p].flatten() for xb, _ in data.train_batches(
        [epoch_generator(*s) for s in seeds], batch)]) for p in range(len(seeds))]


def test_particles_draw_their_own_reproducible_orders():
    data = indexed_data()
    first, second = orders(data, [(0, 1, 0, 0), (0, 1, 1, 0)])
    assert sorted(first.tolist()) == list(range(50)) and sorted(second.tolist()) == list(range(50))
    assert not torch.equal(first, second)
    again = orders(data, [(0, 1, 0, 0), (0, 1, 1, 0)])
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])
    next_epoch = orders(data, [(0, 1, 0, 1)])[0]
    assert not torch.equal(first, next_epoch)


def test_last_partial_batch_is_dropped():
    data = indexed_data(n=25)
    assert data.steps_per_epoch(10) == 2 and len(orders(data, [(0, 0, 0, 0)])[0]) == 20
    assert data.steps_per_epoch(100) == 1 and len(orders(data, [(0, 0, 0, 0)], batch=100)[0]) == 25


def test_crop_and_flip_are_windows_of_the_padded_image():
    """Padding with each channel's value of a black pixel, as cropping before normalising does."""
    torch.manual_seed(0)
    x = torch.randn(40, 2, 4, 5)
    black = torch.tensor([-1.5, -0.25])
    data = TensorData(x, torch.arange(40), x[:2], torch.zeros(2), 40, crop_padding=1, flip=True, pad_value=black)
    padded = torch.nn.functional.pad(x - black[:, None, None], (1, 1, 1, 1)) + black[:, None, None]
    padded[:, :, 1:-1, 1:-1] = x
    flipped_any = shifted_any = False
    for xb, yb in data.train_batches([epoch_generator(5, 0, 0, 0)], 8):
        for image, label in zip(xb[0], yb[0]):
            windows = [(padded[label, :, r:r + 4, c:c + 5], flip) for r in range(3) for c in range(3)
                       for flip in (False, True)]
            hits = [(r, flip) for r, (w, flip) in enumerate(windows)
                    if torch.equal(w.flip(-1) if flip else w, image)]
            assert hits, "augmented image is no window of the padded original"
            flipped_any |= any(f for _, f in hits) and not any(not f for _, f in hits)
            shifted_any |= all(r // 2 != 4 for r, _ in hits)
    assert flipped_any and shifted_any
