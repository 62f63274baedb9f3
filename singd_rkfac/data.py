"""scikit-learn's bundled digits dataset and two small models for it.

The demo, the CLI and the benchmarks need a real dataset that ships with a
dependency (no download): the 8×8 handwritten digits of scikit-learn. It is an
optional dependency (the ``test`` and ``bench`` extras), so it is imported only
when the data are loaded.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["Digits", "load_digits", "digits_mlp", "digits_cnn", "MODELS", "batch_order"]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


class Digits(NamedTuple):
    """Train and test split: features ``(N, 64)`` (or images ``(N, 1, 8, 8)``) and labels ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _sklearn():
    """The scikit-learn modules used here, with an install hint when missing."""
    try:
        from sklearn import datasets, model_selection, preprocessing
    except ImportError as error:
        raise ImportError(
            "the digits dataset needs scikit-learn: pip install scikit-learn "
            "(or install this package with the 'bench' or 'test' extra)"
        ) from error
    return datasets, model_selection, preprocessing


def load_digits(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    test_fraction: float = 0.25,
    seed: int = 0,
    *,
    images: bool = False,
) -> Digits:
    """The digits dataset, split (stratified) and standardised with statistics of the train split only.

    Args:
        device: where the tensors live.
        dtype: floating dtype of the features.
        test_fraction: share of the samples held out, in ``(0, 1)``.
        seed: seed of the split.
        images: return the features as ``(N, 1, 8, 8)`` images (for CNNs).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1) (got {test_fraction!r})")
    datasets, model_selection, preprocessing = _sklearn()
    x, y = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    scaler = preprocessing.StandardScaler().fit(x_train)
    shape = (-1, *IMAGE_SHAPE) if images else (-1, x.shape[1])

    def features(a) -> Tensor:
        return torch.as_tensor(scaler.transform(a), dtype=dtype, device=device).reshape(shape)

    def labels(a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return Digits(features(x_train), labels(y_train), features(x_test), labels(y_test))


def digits_mlp() -> nn.Sequential:
    """MLP 64 → 128 → 128 → 10 with ReLU; layers ``fc1``, ``fc2``, ``head``."""
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(64, 128),
            act1=nn.ReLU(),
            fc2=nn.Linear(128, 128),
            act2=nn.ReLU(),
            head=nn.Linear(128, NUM_CLASSES),
        )
    )


def digits_cnn() -> nn.Sequential:
    """Small CNN on 1×8×8 images: two 3×3 convs (16, 32 channels), 2×2 max-pool, linear ``head``."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, kernel_size=3, padding=1),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(16, 32, kernel_size=3, padding=1),
            act2=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            head=nn.Linear(32 * 4 * 4, NUM_CLASSES),
        )
    )


#: Built-in models by the name the CLI accepts.
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": digits_mlp, "cnn": digits_cnn}


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[Tensor]:
    """Index tensors of ``steps`` minibatches: shuffled epochs, each epoch's last partial batch dropped."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size))
    return batches[:steps]
