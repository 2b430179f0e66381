"""Tests for the image classification datamodules."""

import os
import warnings

import pytest
import torch
from helpers import compose
from hydra.utils import instantiate
from PIL import Image

from repnet.data import (
    DATAMODULES,
    CIFARDataModule,
    DigitsDataModule,
    FakeDataModule,
    ImageFolderDataModule,
)
from repnet.errors import DatasetUnavailableError


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    return datamodule


def test_digits_split_sizes_and_batch_shapes(digits):
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, 8)
    assert (len(digits.train_dataset), len(digits.val_dataset)) == (1437, 360)
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (32,) and labels.dtype == torch.int64
    assert set(digits.val_dataset.labels.tolist()) == set(range(10))


def test_digits_normalised_with_train_stats(digits):
    train_images = digits.train_dataset.images
    assert train_images.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_images.std().item() == pytest.approx(1.0, abs=1e-3)
    assert abs(digits.val_dataset.images.mean().item()) < 0.1


def test_digits_split_is_deterministic_per_seed(digits):
    same = DigitsDataModule(seed=0)
    other = DigitsDataModule(seed=1)
    same.setup()
    other.setup()
    assert torch.equal(same.val_dataset.images, digits.val_dataset.images)
    assert torch.equal(same.val_dataset.labels, digits.val_dataset.labels)
    assert not torch.equal(other.val_dataset.images, digits.val_dataset.images)


def test_digits_augments_train_but_not_val(digits):
    torch.manual_seed(0)
    stored = digits.train_dataset.images[0]
    shifted = [digits.train_dataset[0][0] for _ in range(10)]
    assert any(not torch.equal(image, stored) for image in shifted)
    stored_values = set(stored.unique().tolist())
    assert all(set(image.unique().tolist()) <= stored_values for image in shifted)
    assert all(
        torch.equal(digits.val_dataset[0][0], digits.val_dataset.images[0]) for _ in range(3)
    )


def test_digits_upsamples_once_at_setup():
    datamodule = DigitsDataModule(image_size=16, batch_size=8)
    datamodule.setup()
    assert datamodule.val_dataset.images.shape[1:] == (1, 16, 16)
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.shape == (8, 1, 16, 16)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=4", "data.image_size: Input should be greater than or equal to 8"),
        ("data=fake data.in_channels=0", "data.in_channels: Input should be greater"),
        ("data=cifar10 data.seed=-1", "data.seed: Input should be greater than or equal to 0"),
    ],
)
def test_data_options_are_checked_by_the_ranges_in_the_signatures(override, message):
    from repnet.config import check_train_config
    from repnet.errors import UsageError

    with pytest.raises(UsageError, match=message):
        check_train_config(compose(override.split()))


def test_loaders_require_setup():
    with pytest.raises(RuntimeError, match="setup"):
        FakeDataModule().train_dataloader()


def test_fake_shapes_and_determinism():
    def make(seed):
        datamodule = FakeDataModule(
            num_classes=4, in_channels=2, image_size=6, train_size=20, val_size=8, seed=seed
        )
        datamodule.setup()
        return datamodule

    first, again, other = make(0), make(0), make(1)
    assert (len(first.train_dataset), len(first.val_dataset)) == (20, 8)
    images, labels = next(iter(first.val_dataloader()))
    assert images.shape == (8, 2, 6, 6)
    assert labels.min() >= 0 and labels.max() < 4
    assert torch.equal(first.train_dataset.images, again.train_dataset.images)
    assert torch.equal(first.train_dataset.labels, again.train_dataset.labels)
    assert not torch.equal(first.train_dataset.labels, other.train_dataset.labels)


def test_fake_data_is_learnable():
    datamodule = FakeDataModule(num_classes=5, in_channels=1, image_size=8, train_size=200)
    datamodule.setup()
    train, val = datamodule.train_dataset, datamodule.val_dataset
    centroids = torch.stack([train.images[train.labels == c].mean(0) for c in range(5)])
    distances = torch.cdist(val.images.flatten(1), centroids.flatten(1))
    accuracy = (distances.argmin(1) == val.labels).float().mean().item()
    assert accuracy > 0.9


@pytest.fixture
def image_tree(tmp_path):
    """A tiny train/val tree of PNGs for two classes."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 3), ("val", 2)):
        for class_name in ("cat", "dog"):
            folder = tmp_path / split / class_name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = torch.randint(0, 256, (20, 24, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")
    return tmp_path


def test_imagefolder_loads_generated_pngs(image_tree):
    datamodule = ImageFolderDataModule(image_tree, image_size=12, batch_size=4)
    assert (datamodule.num_classes, datamodule.in_channels) == (2, 3)
    datamodule.setup()
    images, labels = next(iter(datamodule.train_dataloader()))
    assert set(labels.tolist()) <= {0, 1}
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.float32
    val_images = torch.cat([batch[0] for batch in datamodule.val_dataloader()])
    assert val_images.shape == (4, 3, 12, 12)
    assert torch.equal(val_images, torch.cat([b[0] for b in datamodule.val_dataloader()]))
    assert datamodule.val_dataset.targets == [0, 0, 1, 1]


def test_default_loader_workers_fit_the_machine(image_tree, tmp_path):
    """The configs' ``num_workers: null`` asks for one worker per usable CPU, up to 8: never
    more than PyTorch warns about (``data=imagefolder`` asked for 8 on this 2-core machine)."""
    usable = min(8, len(os.sched_getaffinity(0)))
    folder = instantiate(compose(["data=imagefolder", f"data.root={image_tree}"]).data)
    cifar = instantiate(compose(["data=cifar10", f"paths.data_dir={tmp_path}"]).data)
    assert folder.num_workers == cifar.num_workers == usable
    folder.setup()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder.train_dataloader()


def test_imagefolder_errors_name_missing_directory(image_tree):
    with pytest.raises(DatasetUnavailableError, match="nowhere"):
        ImageFolderDataModule(image_tree / "nowhere")
    (image_tree / "val" / "dog").rename(image_tree / "val" / "bird")
    with pytest.raises(DatasetUnavailableError, match="same class folders"):
        ImageFolderDataModule(image_tree)


@pytest.mark.parametrize(
    ("name", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_cifar_missing_data_raises_one_clear_error(tmp_path, name, folder):
    datamodule = DATAMODULES[name](data_dir=str(tmp_path), download=False)
    assert (datamodule.in_channels, datamodule.image_size) == (3, 32)
    assert datamodule.num_classes == int(name.removeprefix("cifar"))
    for step in (datamodule.prepare_data, datamodule.setup):
        with pytest.raises(DatasetUnavailableError) as raised:
            step()
        message = str(raised.value)
        assert str(tmp_path / folder) in message
        assert "data.download is false" in message and "set data.download=true" in message


def test_cifar_rejects_other_class_counts():
    with pytest.raises(ValueError, match="10 or 100"):
        CIFARDataModule(num_classes=7)


def test_the_registry_names_every_data_module():
    assert set(DATAMODULES) == {"digits", "cifar10", "cifar100", "imagefolder", "fake"}
    datamodule = DATAMODULES["fake"](num_classes=3, image_size=4)
    assert isinstance(datamodule, FakeDataModule)
    assert (datamodule.num_classes, datamodule.image_size) == (3, 4)


def test_synthetic_images_are_shifted_smooth_class_patterns_at_the_given_signal():
    data = FakeDataModule(
        num_classes=2, image_size=16, train_size=4000, val_size=1, signal=0.5, pattern_size=4
    )
    data.setup()
    patterns = data.patterns
    assert patterns.std().item() == pytest.approx(0.5, rel=1e-3)
    neighbours = (patterns[..., 1:] - patterns[..., :-1]).abs().mean() / patterns.abs().mean()
    assert neighbours < 0.5  # smooth: upsampled from 4x4
    images, labels = data.train_dataset.images, data.train_dataset.labels
    mean = images[labels == 0].mean(0)
    assert (mean - patterns[0]).abs().max() < 0.15  # the pattern under noise, unshifted
    shifted = FakeDataModule(
        num_classes=2, image_size=16, train_size=4000, val_size=1, signal=0.5, max_shift=3
    )
    shifted.setup()
    blurred = shifted.train_dataset.images[shifted.train_dataset.labels == 0].mean(0)
    assert (blurred - shifted.patterns[0]).abs().max() > 0.2  # shifts smear the average
