"""LightningDataModules for image classification."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder
from torchvision.datasets.folder import find_classes
from torchvision.transforms import InterpolationMode, v2

from repnet.config import Seed
from repnet.errors import DatasetUnavailableError
from repnet.models.pretrained import IMAGENET_MEAN, IMAGENET_STD

CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# Ranges of the options users set; the config check reads them from these signatures.
BatchSize = Annotated[int, Field(ge=1, le=65536)]
Workers = Annotated[int, Field(ge=0, le=64)]
ImageSize = Annotated[int, Field(ge=1, le=1024)]
Count = Annotated[int, Field(ge=1, le=1_000_000)]


class TensorImageDataset(Dataset):
    """In-memory images and labels, with an optional per-sample transform."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


def usable_cpus(limit: int) -> int:
    """The CPUs this process may run on (its affinity where the OS has one), at most ``limit``."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(limit, available or 1)


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base class: image shape and class count known at construction, loaders after setup.

    The validation split doubles as the test split. `seed` makes train shuffling reproducible;
    `num_workers=None` takes one loader worker per CPU this process may use, up to 8.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        batch_size: int,
        num_workers: int | None = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = usable_cpus(limit=8) if num_workers is None else num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None

    def preprocessing(self) -> dict[str, Any]:
        """How an image file becomes one input, in the keys timm's ``pretrained_cfg`` uses:
        resize the shorter side to ``side / crop_pct`` (``interpolation``), crop the centre
        ``input_size``, scale pixels to [0, 1], ``(x - mean) / std``; and ``label_names``."""
        mean, std = self.normalisation()
        return {
            "input_size": [self.in_channels, self.image_size, self.image_size],
            "interpolation": "bilinear",
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "label_names": self.label_names(),
        }

    crop_pct = 1.0

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        """Per-channel ``(mean, std)`` of pixels in [0, 1] that the inputs are normalised by."""
        return (0.0,) * self.in_channels, (1.0,) * self.in_channels

    def label_names(self) -> list[str]:
        return [str(label) for label in range(self.num_classes)]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before loaders are built")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images), split stratified by `seed`.

    Images are scaled to [0, 1], normalised with the train split's scalar mean/std and,
    if `image_size` > 8, upsampled once bilinearly. Train images are randomly shifted
    by up to one original pixel, padding with blank (zero-intensity) background.
    """

    def __init__(
        self,
        batch_size: BatchSize = 64,
        num_workers: Workers = 0,
        seed: Seed = 0,
        image_size: Annotated[int, Field(ge=8, le=256)] = 8,
        val_fraction: Annotated[float, Field(ge=0.01, le=0.99)] = 0.2,
    ) -> None:
        super().__init__(10, 1, image_size, batch_size, num_workers, seed)
        self.val_fraction = val_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        digits = load_digits()
        train_images, val_images, train_labels, val_labels = train_test_split(
            digits.images / 16.0,
            digits.target,
            test_size=self.val_fraction,
            stratify=digits.target,
            random_state=self.seed,
        )
        mean, std = float(train_images.mean()), float(train_images.std())
        self.stats = (mean,), (std,)
        shift = v2.RandomCrop(self.image_size, padding=self.image_size // 8, fill=-mean / std)
        self.train_dataset = TensorImageDataset(
            self._to_tensor(train_images, mean, std), torch.as_tensor(train_labels), shift
        )
        self.val_dataset = TensorImageDataset(
            self._to_tensor(val_images, mean, std), torch.as_tensor(val_labels)
        )

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        """The train split's scalar mean and std (known after ``setup``); an image file's
        pixel ``v/255`` is the ink intensity ``x/16`` of the dataset (light digits on dark)."""
        return self.stats

    def _to_tensor(self, images: np.ndarray, mean: float, std: float) -> torch.Tensor:
        """Normalise [N, 8, 8] images to a float tensor of shape [N, 1, image_size, image_size]."""
        tensor = torch.as_tensor((images - mean) / std, dtype=torch.float32).unsqueeze(1)
        if self.image_size == tensor.shape[-1]:
            return tensor
        return F.interpolate(tensor, size=self.image_size, mode="bilinear", align_corners=False)


class CIFARDataModule(ImageClassificationDataModule):
    """CIFAR-10 or CIFAR-100 (chosen by `num_classes`) with crop+flip augmentation."""

    def __init__(
        self,
        data_dir: str | Path = "data",
        num_classes: int = 10,
        batch_size: BatchSize = 128,
        num_workers: Workers | None = None,
        seed: Seed = 0,
        download: bool = True,
    ) -> None:
        if num_classes not in CIFAR_STATS:
            raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
        super().__init__(num_classes, 3, 32, batch_size, num_workers, seed)
        self.data_dir = Path(data_dir)
        self.download = download
        self.dataset_class = CIFAR10 if num_classes == 10 else CIFAR100

    def prepare_data(self) -> None:
        """Download the dataset unless it is already present (and downloading is allowed)."""
        try:
            self.dataset_class(self.data_dir, train=True, download=self.download)
        except (OSError, RuntimeError) as error:
            raise self._unavailable(error) from error

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        mean, std = CIFAR_STATS[self.num_classes]
        train_transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomCrop(32, padding=4),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
        val_transform = v2.Compose(
            [
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
        try:
            self.train_dataset = self.dataset_class(
                self.data_dir, train=True, transform=train_transform
            )
            self.val_dataset = self.dataset_class(
                self.data_dir, train=False, transform=val_transform
            )
        except RuntimeError as error:
            raise self._unavailable(error) from error

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        return CIFAR_STATS[self.num_classes]

    def label_names(self) -> list[str]:
        """The dataset's class names (known after ``setup``)."""
        return list(self.train_dataset.classes)

    def _unavailable(self, error: Exception) -> DatasetUnavailableError:
        where = self.data_dir / self.dataset_class.base_folder
        if self.download:
            why = f"could not be downloaded ({type(error).__name__}: {error})"
            fix = "put it there or rerun with network access"
        else:
            why, fix = "data.download is false", "put it there or set data.download=true"
        return DatasetUnavailableError(
            f"CIFAR-{self.num_classes} not found in {where}; {why}: {fix}"
        )


def _class_folders(root: Path, split: str) -> list[str]:
    """Sorted class folder names under `root/split`."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetUnavailableError(
            f"{split_dir} not found; ImageFolderDataModule expects class subfolders "
            f"under {root / 'train'} and {root / 'val'}"
        )
    return find_classes(split_dir)[0]


def image_transform(preprocessing: dict[str, Any]) -> Callable:
    """PIL image → normalised tensor: shorter side to ``round(H / crop_pct)`` (PIL's resize),
    centre ``H×W`` crop, pixels to [0, 1], ``(x - mean) / std``."""
    channels, height, width = preprocessing["input_size"]
    mode = "L" if channels == 1 else "RGB"
    return v2.Compose(
        [
            lambda image: image.convert(mode),
            v2.Resize(
                round(height / preprocessing["crop_pct"]),
                InterpolationMode(preprocessing["interpolation"]),
            ),
            v2.CenterCrop((height, width)),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(preprocessing["mean"], preprocessing["std"]),
        ]
    )


class ImageFolderDataModule(ImageClassificationDataModule):
    """Images in `root/train/<class>/` and `root/val/<class>/`, ImageNet-style preprocessing."""

    def __init__(
        self,
        root: str | Path,
        image_size: ImageSize = 224,
        batch_size: BatchSize = 64,
        num_workers: Workers | None = None,
        seed: Seed = 0,
    ) -> None:
        root = Path(root)
        classes = _class_folders(root, "train")
        if _class_folders(root, "val") != classes:
            raise DatasetUnavailableError(
                f"{root / 'val'} must contain the same class folders as {root / 'train'}"
            )
        super().__init__(len(classes), 3, image_size, batch_size, num_workers, seed)
        self.root = root
        self.classes = classes

    crop_pct = 224 / 256  # the validation transform: resize to side·256/224, crop the centre

    def normalisation(self) -> tuple[Sequence[float], Sequence[float]]:
        return IMAGENET_MEAN, IMAGENET_STD

    def label_names(self) -> list[str]:
        """The class folder names."""
        return list(self.classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train_transform = v2.Compose(
            [
                v2.ToImage(),
                v2.RandomResizedCrop(self.image_size),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(*self.normalisation()),
            ]
        )
        self.train_dataset = ImageFolder(self.root / "train", train_transform)
        self.val_dataset = ImageFolder(self.root / "val", image_transform(self.preprocessing()))


class FakeDataModule(ImageClassificationDataModule):
    """Generated images: ``x = signal·P[y] shifted by (dy, dx) + ε``, ``ε ~ N(0, 1)``.

    ``P[y]`` is a fixed random pattern per class: Gaussian noise at ``pattern_size``
    (bilinearly upsampled to the image: smooth, image-like), and each sample's pattern is
    rolled by up to ``max_shift`` pixels per axis. The defaults are easily separable;
    ``data=synthetic`` (more classes, weaker signal, shifts) is a task that takes a real
    network some epochs to learn.
    """

    def __init__(
        self,
        num_classes: Annotated[int, Field(ge=1, le=100_000)] = 10,
        in_channels: Annotated[int, Field(ge=1, le=64)] = 3,
        image_size: ImageSize = 32,
        train_size: Count = 256,
        val_size: Count = 64,
        batch_size: BatchSize = 32,
        num_workers: Workers = 0,
        seed: Seed = 0,
        signal: Annotated[float, Field(gt=0, le=100)] = 1.0,
        pattern_size: ImageSize | None = None,
        max_shift: Annotated[int, Field(ge=0, le=512)] = 0,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, batch_size, num_workers, seed)
        self.train_size, self.val_size = train_size, val_size
        self.signal, self.pattern_size, self.max_shift = signal, pattern_size, max_shift

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        self.patterns = self.signal * self._patterns(generator)
        self.train_dataset = self._sample(self.train_size, generator)
        self.val_dataset = self._sample(self.val_size, generator)

    def _patterns(self, generator: torch.Generator) -> torch.Tensor:
        size = self.pattern_size or self.image_size
        patterns = torch.randn(self.num_classes, self.in_channels, size, size, generator=generator)
        if size == self.image_size:
            return patterns
        smooth = F.interpolate(patterns, size=self.image_size, mode="bilinear")
        return smooth / smooth.std()  # unit variance, as an unsmoothed pattern

    def _sample(self, size: int, generator: torch.Generator) -> TensorImageDataset:
        labels = torch.randint(self.num_classes, (size,), generator=generator)
        shape = (self.in_channels, self.image_size, self.image_size)
        images = torch.randn(size, *shape, generator=generator)
        shifts = torch.randint(-self.max_shift, self.max_shift + 1, (size, 2), generator=generator)
        for image, label, (dy, dx) in zip(images, labels, shifts.tolist()):
            image += self.patterns[label].roll((dy, dx), dims=(1, 2))
        return TensorImageDataset(images, labels)


# The data modules by name; deploy.py builds only these from a run's config.
DATAMODULES: dict[str, Callable[..., ImageClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": partial(CIFARDataModule, num_classes=10),
    "cifar100": partial(CIFARDataModule, num_classes=100),
    "imagefolder": ImageFolderDataModule,
    "fake": FakeDataModule,
}
