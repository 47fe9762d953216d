"""Device, scale and seed for the whole course, and checked construction of config dataclasses.

Introduced in `00_tour.ipynb`. Every notebook and every zoo entry reads these three settings
from here, so one environment variable changes them everywhere:

- ``MMLIB_SCALE``: ``tiny`` (default; laptop CPU and CI), ``small`` (a Colab GPU) or ``full``
  (real checkpoints on real GPUs);
- ``MMLIB_SEED``: an integer, default 0; every random thing in the course flows from it;
- ``MMLIB_DEVICE``: optional override of the device (``cpu``, ``cuda``, ``cuda:1``, ``mps``).
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any, TypeVar

import numpy as np
import torch

SCALES = ("tiny", "small", "full")
DEFAULT_SCALE = "tiny"
DEFAULT_SEED = 0

T = TypeVar("T")


def scale() -> str:
    """The course scale from ``MMLIB_SCALE`` (default ``tiny``), checked against `SCALES`."""
    return check_scale(os.environ.get("MMLIB_SCALE", DEFAULT_SCALE))


def check_scale(name: str) -> str:
    """Return `name` if it is a known scale, else raise a ValueError listing the valid ones."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid scales: {', '.join(SCALES)} (set MMLIB_SCALE)")
    return name


def seed() -> int:
    """The course seed from ``MMLIB_SEED`` (default 0)."""
    text = os.environ.get("MMLIB_SEED", str(DEFAULT_SEED))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"MMLIB_SEED must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"MMLIB_SEED must be a non-negative integer, got {value}")
    return value


def device() -> torch.device:
    """The device to compute on: ``MMLIB_DEVICE`` if set, else cuda, then mps, then cpu."""
    override = os.environ.get("MMLIB_DEVICE")
    if override:
        try:
            return torch.device(override)
        except RuntimeError as error:
            raise ValueError(f"MMLIB_DEVICE={override!r} is not a torch device: {error}") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(value: int | None = None) -> int:
    """Seed Python, NumPy and torch with `value` (default: the course seed) and return it."""
    value = seed() if value is None else value
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def describe() -> str:
    """One line naming the device, scale and seed in use, printed by every notebook's setup cell."""
    return f"device={device()} scale={scale()} seed={seed()} torch={torch.__version__}"


def make_config(cls: type[T], overrides: dict[str, Any] | None = None, **kwargs: Any) -> T:
    """Build the dataclass `cls` from keyword overrides, rejecting keys it does not have.

    ``make_config(WorldConfig, image_size=64)`` works; ``make_config(WorldConfig, imagesize=64)``
    raises a ValueError that lists the valid keys instead of a bare ``TypeError``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values = {**(overrides or {}), **kwargs}
    valid = [field.name for field in dataclasses.fields(cls) if field.init]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"valid keys: {', '.join(valid)}"
        )
    return cls(**values)
