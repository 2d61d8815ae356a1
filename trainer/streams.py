"""Task streams: a deterministic sequence of classification tasks built from offline data.

Task i of a stream depends only on (stream, seed, i), never on how many tasks are requested, so
training 3 tasks and later appending 2 gives the same tasks as training 5 at once.

Streams and where their data comes from:

- `permuted-digits`, `split-digits` (5 x 2 classes), `rotated-digits`: scikit-learn's bundled 8x8 digits.
- `permuted-mnist1d`, `split-mnist1d` (5 x 2 classes): MNIST-1D, generated in-process by `mnist1d`.
- `permuted-NAME`, `split-NAME` for NAME in mnist, fashionmnist, cifar10 (split: 5 x 2 classes),
  cifar100 (split: 20 x 5 classes, as SupSup), imagefolder (split: tasks of 5 classes): local files
  under `data_root` (`--data-root`) read with torchvision, never downloaded (`DataUnavailable`
  says what is missing). Permuted streams shuffle pixel positions, the same way in every channel.

Every x is float32 `[N, features]` (images flattened channel-major, scaled to [0, 1]); every y is
int64 in `[0, task.num_classes)`.
"""

from __future__ import annotations

import inspect
import math
import os
import random
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from registry import label_problem
from registry.errors import MaskbankError, unknown


class DataUnavailable(MaskbankError):
    """A stream's dataset files are missing (no data root, a missing root, absent or bad files)."""


@dataclass(frozen=True)
class TaskData:
    """One task: train/test tensors (x float32 [N, features], y int64 in [0, num_classes)), and the
    name of each class (`labels[y]`: "3" for a split task's digit 3, relabelled 1) where the stream
    knows them (empty otherwise)."""

    index: int
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    labels: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(self.labels))
        if problem := label_problem(self.labels, self.num_classes):
            raise ValueError(f"task {self.index} ({self.name}): {problem}")


@dataclass(frozen=True)
class TaskStream:
    """A named, seeded sequence of tasks over one input space.

    `input_shape` is what the model receives (flat: `(features,)`); `image_shape` is the
    (channels, height, width) those features unflatten to, for streams of images (None otherwise),
    so a conv architecture can be specified as `{"arch": "cnn", "input_shape": list(image_shape)}`.
    `num_classes` is the largest class count of any task.
    """

    name: str
    seed: int
    input_shape: tuple[int, ...]
    num_classes: int
    max_tasks: int
    make_task: Callable[[int], TaskData]
    image_shape: tuple[int, int, int] | None = None

    def task(self, index: int) -> TaskData:
        if not 0 <= index < self.max_tasks:
            raise ValueError(f"stream '{self.name}' has tasks 0..{self.max_tasks - 1}, not {index}")
        return self.make_task(index)


_STREAMS: dict[str, Callable[..., TaskStream]] = {}


def register_stream(name: str):
    """Decorator: make a stream factory available by name.

    A factory is `factory(seed) -> TaskStream`, or `factory(seed, data_root) -> TaskStream` when it
    reads files: only factories with a `data_root` parameter are given the data root.
    """

    def decorate(factory: Callable[..., TaskStream]) -> Callable[..., TaskStream]:
        _STREAMS[name] = factory
        return factory

    return decorate


MAX_SEED = 2**32 - 1


def get_stream(name: str, seed: int = 0, data_root: str | os.PathLike | None = None) -> TaskStream:
    """The stream `name` with `seed`; streams that read files look for them under `data_root`.

    Raises:
        UnknownName: no stream of that name.
        MaskbankError: a seed numpy and scikit-learn cannot take (below 0 or at least 2**32).
        DataUnavailable: the stream reads files and `data_root` is None, missing, or lacks them.
    """
    if name not in _STREAMS:
        raise unknown("stream", name, _STREAMS)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise MaskbankError(f"a seed is an integer from 0 to {MAX_SEED} (numpy's and scikit-learn's range), got {seed!r}")
    factory = _STREAMS[name]
    if reads_files(name):
        return factory(seed, data_root=data_root)
    return factory(seed)  # data_root is ignored by streams that need no files


def reads_files(name: str) -> bool:
    """Whether stream `name` reads its examples from files under a data root (torchvision
    datasets, image folders), rather than being built in (scikit-learn's digits, MNIST-1D)."""
    return name in _STREAMS and "data_root" in inspect.signature(_STREAMS[name]).parameters


def stream_names() -> list[str]:
    return sorted(_STREAMS)


def _tensors(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _split_task(index: int, name: str, data: tuple[np.ndarray, ...], classes_per_task: int) -> TaskData:
    """Task `index` of a split stream: classes [index*k, (index+1)*k), relabelled 0..k-1 (labelled by digit)."""
    x_train, x_test, y_train, y_test = data
    first = classes_per_task * index
    classes = np.arange(first, first + classes_per_task)
    train, test = np.isin(y_train, classes), np.isin(y_test, classes)
    xs = _tensors(x_train[train], y_train[train] - first, x_test[test], y_test[test] - first)
    return TaskData(index, f"{name}-{classes[0]}-{classes[-1]}", *xs, num_classes=classes_per_task,
                    labels=tuple(map(str, classes)))


DIGIT_LABELS = tuple(map(str, range(10)))  # the ten classes of the digits and MNIST-1D streams


# ---------------------------------------------------------------- 8x8 digits (scikit-learn)

_DIGITS_SHAPE = (1, 8, 8)


@lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[np.ndarray, ...]:
    """sklearn's 1797 8x8 digits (shipped with scikit-learn), scaled to [0, 1], split 80/20 stratified."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return tuple(train_test_split(x, data.target.astype(np.int64), test_size=0.2, stratify=data.target, random_state=seed))


@register_stream("permuted-digits")
def permuted_digits(seed: int) -> TaskStream:
    """Every task: all ten digits, pixels shuffled by a fixed permutation drawn from (seed, task)."""

    def make_task(index: int) -> TaskData:
        x_train, x_test, y_train, y_test = _digits(seed)
        perm = np.random.default_rng([seed, index]).permutation(x_train.shape[1])
        xs = _tensors(x_train[:, perm], y_train, x_test[:, perm], y_test)
        return TaskData(index, f"perm-{index}", xs[0], xs[1], xs[2], xs[3], num_classes=10, labels=DIGIT_LABELS)

    return TaskStream("permuted-digits", seed, (64,), num_classes=10, max_tasks=10_000, make_task=make_task,
                      image_shape=_DIGITS_SHAPE)


@register_stream("split-digits")
def split_digits(seed: int) -> TaskStream:
    """Five tasks of two classes each: (0,1), (2,3), ... relabelled 0/1."""

    def make_task(index: int) -> TaskData:
        return _split_task(index, "digits", _digits(seed), classes_per_task=2)

    return TaskStream("split-digits", seed, (64,), num_classes=2, max_tasks=5, make_task=make_task,
                      image_shape=_DIGITS_SHAPE)


def rotation_angle(seed: int, index: int) -> float:
    """The angle (degrees, counter-clockwise, uniform in [0, 360)) of task `index` of rotated-digits."""
    return float(np.random.default_rng([seed, index]).uniform(0.0, 360.0))


@register_stream("rotated-digits")
def rotated_digits(seed: int) -> TaskStream:
    """Every task: all ten digits, each 8x8 image rotated about its centre by one angle drawn from
    (seed, task) (`rotation_angle`); bilinear, corners filled with 0, reshaped back to 64 features."""
    from scipy import ndimage  # scipy comes with scikit-learn

    def rotate(x: np.ndarray, angle: float) -> np.ndarray:
        images = ndimage.rotate(x.reshape(-1, 8, 8), angle, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
        return np.clip(images, 0.0, 1.0).reshape(len(x), 64).astype(np.float32)

    def make_task(index: int) -> TaskData:
        x_train, x_test, y_train, y_test = _digits(seed)
        angle = rotation_angle(seed, index)
        xs = _tensors(rotate(x_train, angle), y_train, rotate(x_test, angle), y_test)
        return TaskData(index, f"rot-{index}-{round(angle)}deg", *xs, num_classes=10, labels=DIGIT_LABELS)

    return TaskStream("rotated-digits", seed, (64,), num_classes=10, max_tasks=10_000, make_task=make_task,
                      image_shape=_DIGITS_SHAPE)


# ---------------------------------------------------------------- MNIST-1D (generated offline)

MNIST1D_BASE_SEED = 42  # the mnist1d package's default: stream seed 0 generates the standard dataset
_MNIST1D_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _mnist1d(seed: int) -> tuple[np.ndarray, ...]:
    """MNIST-1D generated with the package's default arguments and generation seed 42 + seed:
    4000 train / 1000 test sequences of 40 float32 values (standardised by the generator), 10 classes.

    Note:
        `make_dataset` seeds and draws from numpy's and Python's global random generators; their
        states are saved and restored around it (under a lock), so loading a stream disturbs no
        one else's random numbers. Nothing is downloaded: `get_dataset`, which downloads, is not used.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = (MNIST1D_BASE_SEED + seed) % 2**32
    with _MNIST1D_LOCK:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            data = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    return (data["x"].astype(np.float32), data["x_test"].astype(np.float32),
            data["y"].astype(np.int64), data["y_test"].astype(np.int64))


@register_stream("permuted-mnist1d")
def permuted_mnist1d(seed: int) -> TaskStream:
    """Every task: all ten MNIST-1D classes, the 40 positions shuffled by a fixed permutation from (seed, task)."""

    def make_task(index: int) -> TaskData:
        x_train, x_test, y_train, y_test = _mnist1d(seed)
        perm = np.random.default_rng([seed, index]).permutation(x_train.shape[1])
        xs = _tensors(x_train[:, perm], y_train, x_test[:, perm], y_test)
        return TaskData(index, f"perm-{index}", *xs, num_classes=10, labels=DIGIT_LABELS)

    return TaskStream("permuted-mnist1d", seed, (40,), num_classes=10, max_tasks=10_000, make_task=make_task)


@register_stream("split-mnist1d")
def split_mnist1d(seed: int) -> TaskStream:
    """Five MNIST-1D tasks of two classes each: (0,1), (2,3), ... relabelled 0/1."""

    def make_task(index: int) -> TaskData:
        return _split_task(index, "mnist1d", _mnist1d(seed), classes_per_task=2)

    return TaskStream("split-mnist1d", seed, (40,), num_classes=2, max_tasks=5, make_task=make_task)


# ---------------------------------------------------------------- image datasets on local files


@dataclass(frozen=True)
class _ImageDataset:
    title: str
    layout: str  # what torchvision expects under the data root
    classes_per_task: int  # of the split stream: 2 (5 tasks) for 10 classes; CIFAR-100: 20 tasks of 5, as in SupSup


_IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (uncompressed)"
_IMAGE_DATASETS = {
    "mnist": _ImageDataset("MNIST", f"MNIST/raw/ with {_IDX_FILES}", 2),
    "fashionmnist": _ImageDataset("Fashion-MNIST", f"FashionMNIST/raw/ with {_IDX_FILES}", 2),
    "cifar10": _ImageDataset("CIFAR-10", "cifar-10-batches-py/ (cifar-10-python.tar.gz extracted)", 2),
    "cifar100": _ImageDataset("CIFAR-100", "cifar-100-python/ (cifar-100-python.tar.gz extracted)", 5),
    # Classes are the class folders in sorted order; images are read as RGB (C = 3). The split
    # stream has (number of classes) // 5 tasks: the last (number of classes) % 5 classes are unused.
    "imagefolder": _ImageDataset("Image-folder", "train/CLASS/IMAGE and test/CLASS/IMAGE (or val/CLASS/IMAGE), "
                                 "one folder per class, every image of one size", 5),
}


def _unavailable(key: str, root, problem: str) -> DataUnavailable:
    dataset = _IMAGE_DATASETS[key]
    return DataUnavailable(
        f"{dataset.title} streams read local files and never download: {problem}. Pass --data-root DIR "
        f"(in Python: get_stream(..., data_root=DIR)), where DIR holds {dataset.layout}, as torchvision.datasets "
        "expects"
    )


def _root(key: str, data_root) -> Path:
    if data_root is None:
        raise _unavailable(key, None, "no data root was given")
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise _unavailable(key, root, f"the data root '{root}' is not a directory")
    return root


@lru_cache(maxsize=2)
def _load_images(key: str, root: Path) -> tuple[tuple[np.ndarray, ...], tuple[int, int, int], tuple[str, ...]]:
    """((x_train uint8 [N, C, H, W], x_test, y_train int64, y_test), (C, H, W), class names) of a dataset under `root`."""
    from torchvision import datasets  # imported here: torchvision is slow to import

    try:
        if key in ("mnist", "fashionmnist"):
            cls = datasets.MNIST if key == "mnist" else datasets.FashionMNIST
            parts = [cls(root, train=train, download=False) for train in (True, False)]
            xs = [p.data.numpy()[:, None] for p in parts]
            ys = [p.targets.numpy().astype(np.int64) for p in parts]
            names = parts[0].classes
        elif key in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if key == "cifar10" else datasets.CIFAR100
            parts = [cls(root, train=train, download=False) for train in (True, False)]
            xs = [p.data.transpose(0, 3, 1, 2) for p in parts]  # HWC -> CHW
            ys = [np.asarray(p.targets, dtype=np.int64) for p in parts]
            names = parts[0].classes
        else:
            xs, ys, names = _load_image_folder(key, root, datasets.ImageFolder)
    except (RuntimeError, OSError, ValueError) as error:  # torchvision: "Dataset not found or corrupted", ...
        reason = str(error).split(". You can use download=True")[0]  # that advice does not apply here
        raise _unavailable(key, root, f"could not read it from '{root}' ({reason})") from error
    shape = tuple(int(d) for d in xs[0].shape[1:])
    if problem := label_problem(names, len(names)):  # a folder's name: said before any work, not when a task is made
        raise _unavailable(key, root, f"{problem}: rename that class's folders")
    arrays = (np.ascontiguousarray(xs[0]), np.ascontiguousarray(xs[1]), ys[0], ys[1])
    return arrays, shape, tuple(names)  # type: ignore[return-value]


def _load_image_folder(key: str, root: Path, image_folder) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise _unavailable(key, root, f"'{root}' needs a train/ and a test/ (or val/) folder")
    parts = [image_folder(str(root / "train")), image_folder(str(test_dir))]
    if parts[0].classes != parts[1].classes:
        raise _unavailable(key, root, f"train/ has the classes {parts[0].classes}, {test_dir.name}/ {parts[1].classes}")
    xs, ys, first = [], [], None
    for part in parts:
        images = []
        for path, _ in part.samples:
            image = np.asarray(part.loader(path), dtype=np.uint8)  # RGB, [H, W, 3]
            first = first or (path, image.shape)
            if image.shape != first[1]:
                raise _unavailable(key, root, f"'{path}' is {image.shape[1]}x{image.shape[0]} but '{first[0]}' is "
                                   f"{first[1][1]}x{first[1][0]}; resize the images to one size beforehand")
            images.append(image.transpose(2, 0, 1))
        xs.append(np.stack(images))
        ys.append(np.asarray(part.targets, dtype=np.int64))
    return xs, ys, parts[0].classes


def _as_features(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (or [N, C, H*W]) -> float32 [N, C*H*W] in [0, 1]."""
    images = torch.as_tensor(images)
    return images.reshape(len(images), -1).to(torch.float32).div_(255.0)


def _image_streams(key: str) -> None:
    """Register `split-<key>` and `permuted-<key>`."""
    per_task = _IMAGE_DATASETS[key].classes_per_task

    def split(seed: int, data_root=None) -> TaskStream:
        root = _root(key, data_root)
        (x_train, x_test, y_train, y_test), shape, names = _load_images(key, root)
        tasks = (int(max(y_train.max(), y_test.max())) + 1) // per_task
        if tasks == 0:
            raise _unavailable(key, root, f"a split stream needs at least {per_task} classes, '{root}' has fewer")

        def make_task(index: int) -> TaskData:
            first = per_task * index
            keep = [np.isin(y, np.arange(first, first + per_task)) for y in (y_train, y_test)]
            return TaskData(index, f"{key}-{first}-{first + per_task - 1}",
                            _as_features(x_train[keep[0]]), torch.from_numpy(y_train[keep[0]] - first),
                            _as_features(x_test[keep[1]]), torch.from_numpy(y_test[keep[1]] - first),
                            num_classes=per_task, labels=names[first:first + per_task])

        return TaskStream(f"split-{key}", seed, (math.prod(shape),), num_classes=per_task, max_tasks=tasks,
                          make_task=make_task, image_shape=shape)

    def permuted(seed: int, data_root=None) -> TaskStream:
        root = _root(key, data_root)
        (x_train, x_test, y_train, y_test), shape, names = _load_images(key, root)
        classes = int(max(y_train.max(), y_test.max())) + 1

        def make_task(index: int) -> TaskData:
            # one permutation of the H*W pixel positions, the same for every channel
            perm = torch.from_numpy(np.random.default_rng([seed, index]).permutation(shape[1] * shape[2]))

            def permute(x: np.ndarray) -> torch.Tensor:  # uint8 [N, C, H, W] -> float32 [N, C*H*W]
                return _as_features(torch.from_numpy(x).reshape(len(x), shape[0], -1)[:, :, perm])

            return TaskData(index, f"perm-{index}", permute(x_train), torch.from_numpy(y_train),
                            permute(x_test), torch.from_numpy(y_test), num_classes=classes,
                            labels=names if len(names) == classes else ())

        return TaskStream(f"permuted-{key}", seed, (math.prod(shape),), num_classes=classes, max_tasks=10_000,
                          make_task=make_task, image_shape=shape)

    split.__doc__ = (f"{_IMAGE_DATASETS[key].title}, split into tasks of {per_task} consecutive classes "
                     f"(0..{per_task - 1}, {per_task}..{2 * per_task - 1}, ...) relabelled from 0; "
                     "the seed changes nothing.")
    permuted.__doc__ = f"{_IMAGE_DATASETS[key].title}, all classes, one fixed pixel permutation per (seed, task)."
    register_stream(f"split-{key}")(split)
    register_stream(f"permuted-{key}")(permuted)


for _key in _IMAGE_DATASETS:
    _image_streams(_key)
