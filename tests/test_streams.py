"""Task streams: deterministic by (seed, task), documented shapes and labels, and streams over local
files that say what is missing instead of downloading."""

import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from registry import MaskbankError, build_architecture
from trainer import get_stream, stream_names
from trainer.streams import DataUnavailable, TaskData, TaskStream, _mnist1d, rotation_angle

IMAGE_STREAMS = [f"{kind}-{name}" for name in ("mnist", "fashionmnist", "cifar10", "cifar100", "imagefolder")
                 for kind in ("split", "permuted")]
TITLES = {"mnist": "MNIST", "fashionmnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100",
          "imagefolder": "Image-folder"}


def assert_well_formed(stream: TaskStream, index: int, features: int, classes: int):
    task = stream.task(index)
    assert task.index == index and task.num_classes == classes and len(task.labels) == classes  # each class named
    for x, y in ((task.x_train, task.y_train), (task.x_test, task.y_test)):
        assert x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] == features and len(x) == len(y) > 0
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(classes))
    return task


def assert_same_task(a, b):
    assert a.name == b.name and a.num_classes == b.num_classes
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_every_stream_is_registered():
    assert {"rotated-digits", "permuted-mnist1d", "split-mnist1d", *IMAGE_STREAMS} <= set(stream_names())


def test_tasks_name_their_classes():
    """A split task's class 1 is a digit the client could not tell: the served logits came without names."""
    assert get_stream("split-digits").task(1).labels == ("2", "3")
    assert get_stream("split-mnist1d").task(4).labels == ("8", "9")
    for name in ("permuted-digits", "rotated-digits", "permuted-mnist1d"):
        assert get_stream(name).task(2).labels == tuple("0123456789")


def test_labels_must_be_text_on_one_line(tmp_path):
    """A plugin's int labels published a manifest nothing could read again; a folder named with a line
    break gave Triton's label file a line too many, so the classes after it had the wrong names."""
    x, y = torch.zeros(2, 4), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"task 0 \(t\): class label 0 is a int, not text"):
        TaskData(0, "t", x, y, x, y, num_classes=2, labels=[0, 1])
    with pytest.raises(ValueError, match=r"class label 'x\\ny' has a line break"):
        TaskData(0, "t", x, y, x, y, num_classes=2, labels=["a", "x\ny"])
    with pytest.raises(ValueError, match=r"class label 'lat\\udce9n' is not UTF-8 text"):  # a folder name's byte 0xe9
        TaskData(0, "t", x, y, x, y, num_classes=2, labels=["a", b"lat\xe9n".decode("utf-8", "surrogateescape")])
    root = make_image_folder(tmp_path, classes=5)
    (root / "train" / "c04").rename(root / "train" / "x\ny")
    (root / "test" / "c04").rename(root / "test" / "x\ny")
    with pytest.raises(DataUnavailable, match=r"class label 'x\\ny' has a line break .*: rename that class's folders"):
        get_stream("split-imagefolder", data_root=root)


def test_rotated_digits():
    stream = get_stream("rotated-digits", seed=2)
    assert (stream.input_shape, stream.image_shape, stream.num_classes) == ((64,), (1, 8, 8), 10)
    task = assert_well_formed(stream, 3, 64, 10)
    assert task.name == f"rot-3-{round(rotation_angle(2, 3))}deg"
    assert 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
    assert_same_task(task, get_stream("rotated-digits", seed=2).task(3))
    assert rotation_angle(2, 3) != rotation_angle(2, 4) and rotation_angle(2, 3) != rotation_angle(3, 3)
    other = stream.task(4)
    assert torch.equal(task.y_train, other.y_train) and not torch.equal(task.x_train, other.x_train)


def test_rotation_turns_the_image_about_its_centre():
    from trainer.streams import _digits

    x_train = _digits(0)[0]
    stream = get_stream("rotated-digits")
    # find a task whose angle is close to 90 degrees and compare with numpy's exact quarter turn
    index = next(i for i in range(5000) if abs(rotation_angle(0, i) - 90) < 1)
    rotated = stream.task(index).x_train.numpy().reshape(-1, 8, 8)
    quarter, clockwise = (np.rot90(x_train.reshape(-1, 8, 8), k=k, axes=(1, 2)) for k in (1, -1))
    assert np.abs(rotated - quarter).mean() < 0.08 < np.abs(rotated - clockwise).mean()  # counter-clockwise


def test_mnist1d_streams():
    permuted, split = get_stream("permuted-mnist1d", seed=0), get_stream("split-mnist1d", seed=0)
    assert (permuted.input_shape, permuted.image_shape, permuted.num_classes, permuted.max_tasks) == ((40,), None, 10, 10_000)
    assert (split.input_shape, split.num_classes, split.max_tasks) == ((40,), 2, 5)
    a, b = assert_well_formed(permuted, 0, 40, 10), assert_well_formed(permuted, 1, 40, 10)
    assert len(a.y_train) == 4000 and len(a.y_test) == 1000
    assert not torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_train.sort(dim=1).values, b.x_train.sort(dim=1).values)  # same values, permuted
    assert_same_task(b, get_stream("permuted-mnist1d", seed=0).task(1))
    tasks = [assert_well_formed(split, i, 40, 2) for i in range(5)]
    assert [t.name for t in tasks] == ["mnist1d-0-1", "mnist1d-2-3", "mnist1d-4-5", "mnist1d-6-7", "mnist1d-8-9"]
    assert sum(len(t.y_train) for t in tasks) == 4000
    with pytest.raises(ValueError, match="tasks 0..4, not 5"):
        split.task(5)


def test_mnist1d_is_seeded_by_the_stream_and_leaves_global_random_state_alone():
    # stream seed 0 is the package's default dataset (generation seed 42), the same in every process
    x_train, x_test, y_train, y_test = _mnist1d(0)
    assert y_train[:8].tolist() == [2, 6, 4, 5, 6, 6, 6, 0] and y_test[:8].tolist() == [2, 6, 3, 9, 4, 3, 1, 9]
    assert x_train[0, :3].tolist() == pytest.approx([-0.3320057, -0.4719104, -0.7786971], abs=1e-6)
    np.random.seed(123)
    expected = np.random.rand(3)
    np.random.seed(123)
    other = _mnist1d.__wrapped__(1)  # generated now, not taken from the cache
    assert np.array_equal(np.random.rand(3), expected)
    assert not np.array_equal(other[2], y_train)


def test_digits_streams_carry_the_image_shape_and_feed_a_conv_net():
    stream = get_stream("split-digits", 0, data_root="/ignored/by/streams/without/files")
    assert stream.image_shape == (1, 8, 8)
    module = build_architecture({"arch": "cnn", "input_shape": list(stream.image_shape), "num_classes": 2, "width": 4})
    assert module(stream.task(0).x_test).shape == (len(stream.task(0).y_test), 2)


# ---------------------------------------------------------------- streams over local files


@pytest.mark.parametrize("name", IMAGE_STREAMS)
def test_image_streams_without_data_say_what_to_do(name, tmp_path):
    title = TITLES[name.split("-", 1)[1]]
    with pytest.raises(DataUnavailable, match=rf"^{title} streams read local files and never download: "
                                              r"no data root was given\. Pass --data-root DIR"):
        get_stream(name)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataUnavailable, match=rf"the data root '{missing}' is not a directory"):
        get_stream(name, data_root=missing)
    with pytest.raises(DataUnavailable, match=rf"'{tmp_path}'.*\. Pass --data-root DIR .*, where DIR holds") as error:
        get_stream(name, data_root=tmp_path)
    assert "download=True" not in str(error.value)


def write_idx(path, array: np.ndarray):
    """An uncompressed IDX file as MNIST ships it (big-endian dims, uint8 data)."""
    path.write_bytes(struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for prefix, n in (("train", 40), ("t10k", 20)):
        images[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    return tmp_path, images


def test_split_and_permuted_mnist_from_local_files(fake_mnist):
    fake_mnist, images = fake_mnist
    split = get_stream("split-mnist", seed=0, data_root=fake_mnist)
    assert (split.input_shape, split.image_shape, split.num_classes, split.max_tasks) == ((784,), (1, 28, 28), 2, 5)
    task = assert_well_formed(split, 4, 784, 2)
    assert task.name == "mnist-8-9" and len(task.y_train) == 8 and len(task.y_test) == 4
    assert task.labels == ("8 - eight", "9 - nine")  # torchvision's class names
    assert 0.0 <= float(task.x_train.min()) and float(task.x_train.max()) <= 1.0
    expected = torch.from_numpy(images["train"][np.arange(40) % 10 >= 8].reshape(-1, 784)).float() / 255
    assert torch.equal(task.x_train, expected) and task.y_train.tolist() == [0, 1] * 4
    assert_same_task(task, get_stream("split-mnist", seed=7, data_root=str(fake_mnist)).task(4))  # seed-free
    permuted = get_stream("permuted-mnist", seed=1, data_root=fake_mnist)
    a, b = permuted.task(0), permuted.task(1)
    assert a.num_classes == 10 and a.x_train.shape == (40, 784)
    assert not torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.x_train.sort(dim=1).values, b.x_train.sort(dim=1).values)
    assert_same_task(a, get_stream("permuted-mnist", seed=1, data_root=fake_mnist).task(0))
    assert not torch.equal(a.x_train, get_stream("permuted-mnist", seed=2, data_root=fake_mnist).task(0).x_train)


def make_image_folder(root, classes: int = 10, size=(6, 5), odd_one=None):
    """root/{train,test}/cNN/*.png: image j of class c has colour (c, j, 255 - c) and pixel (0, 0) white."""
    for split, count in (("train", 3), ("test", 2)):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            for j in range(count):
                pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array([c, j, 255 - c], dtype=np.uint8)
                pixels[0, 0] = 255
                Image.fromarray(pixels).save(folder / f"{j}.png")
    if odd_one:
        Image.new("RGB", odd_one).save(root / "test" / "c00" / "odd.png")
    return root


def test_split_and_permuted_image_folder_end_to_end(tmp_path):
    root = make_image_folder(tmp_path)
    split = get_stream("split-imagefolder", data_root=root)
    assert (split.input_shape, split.image_shape, split.num_classes, split.max_tasks) == ((90,), (3, 5, 6), 5, 2)
    task = assert_well_formed(split, 1, 90, 5)
    assert task.name == "imagefolder-5-9" and len(task.y_train) == 15 and len(task.y_test) == 10
    assert task.labels == ("c05", "c06", "c07", "c08", "c09")  # the class folders' names
    first = task.x_train[task.y_train == 2][0].reshape(3, 5, 6) * 255  # class 7, image 0, channel-major
    assert first[:, 0, 0].tolist() == [255, 255, 255] and first[:, 1, 1].round().tolist() == [7, 0, 248]
    permuted = get_stream("permuted-imagefolder", seed=0, data_root=root)
    assert (permuted.num_classes, permuted.image_shape) == (10, (3, 5, 6))
    assert permuted.task(0).labels == tuple(f"c{c:02d}" for c in range(10))
    a = assert_well_formed(permuted, 3, 90, 10).x_train.reshape(-1, 3, 30)
    white = (a == 1.0).all(dim=1)  # the white pixel moved to the same position in every channel
    assert white.sum(dim=1).eq(1).all() and len(set(white.float().argmax(dim=1).tolist())) == 1
    assert_same_task(permuted.task(3), get_stream("permuted-imagefolder", seed=0, data_root=root).task(3))


def test_image_folder_problems_are_explained(tmp_path):
    with pytest.raises(DataUnavailable, match=r"needs a train/ and a test/ \(or val/\) folder"):
        get_stream("split-imagefolder", data_root=tmp_path)
    odd = make_image_folder(tmp_path / "odd", odd_one=(4, 4))
    with pytest.raises(DataUnavailable, match=r"odd\.png' is 4x4 but .* is 6x5; resize the images"):
        get_stream("permuted-imagefolder", data_root=odd)
    few = make_image_folder(tmp_path / "few", classes=3)
    with pytest.raises(DataUnavailable, match="a split stream needs at least 5 classes"):
        get_stream("split-imagefolder", data_root=few)


@pytest.mark.parametrize("seed", [-1, 2**32, True, 1.5])
def test_a_seed_numpy_and_scikit_learn_cannot_take_is_refused_by_name(seed):
    with pytest.raises(MaskbankError, match=re.escape(f"a seed is an integer from 0 to 4294967295 (numpy's and "
                                                      f"scikit-learn's range), got {seed!r}")):
        get_stream("permuted-digits", seed)


def test_the_largest_seed_makes_every_task():
    stream = get_stream("split-digits", 2**32 - 1)
    assert [stream.task(i).num_classes for i in range(5)] == [2] * 5
