"""Real data beside the generated world: scikit-learn's bundled handwritten digits, with captions.

Introduced in `00_tour.ipynb`; used again in `01_contrastive_encoders.ipynb` to show that the
same code works on real images. The 1,797 scans (8x8, 16 grey levels) ship inside scikit-learn,
so nothing is downloaded. Captions ("a handwritten seven") come from ``data/captions/digits.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from mmlib import config as course_config
from mmlib.data.captions import data_file
from mmlib.data.world import check_choice, uniform

DIGIT_SPLITS = ("train", "test")
TEST_SIZE = 500  # scans held out for evaluation; the other 1,297 train


@lru_cache(maxsize=None)
def digit_words() -> dict:
    """Digit names and caption templates (``data/captions/digits.json``)."""
    return json.loads(data_file("captions", "digits.json").read_text())


def digit_caption(label: int, variant: int = 0, seed: int = 0) -> str:
    """A caption of a digit, e.g. ``"a handwritten seven"``; `variant` picks the template."""
    words = digit_words()
    u = uniform(seed, np.array([label * 1_000_003 + variant]), "digit-caption")[0, 0]
    template = words["templates"][min(int(u * len(words["templates"])), len(words["templates"]) - 1)]
    return template.format(digit=words["names"][label])


class DigitsDataset(Dataset):
    """Handwritten digits as RGB images (3, size, size) in [0, 1], with labels and captions."""

    def __init__(self, split: str = "train", image_size: int = 32, seed: int | None = None) -> None:
        check_choice("split", split, DIGIT_SPLITS)
        self.seed = course_config.seed() if seed is None else seed
        digits = load_digits()
        order = np.random.default_rng(self.seed).permutation(len(digits.target))
        rows = order[TEST_SIZE:] if split == "train" else order[:TEST_SIZE]
        pixels = torch.from_numpy(digits.images[rows] / 16.0).float()[:, None]  # (N, 1, 8, 8)
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = pixels.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, size, size)
        self.labels = torch.from_numpy(digits.target[rows]).long()
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int) -> dict:
        label = int(self.labels[item])
        return {
            "image": self.images[item],
            "label": self.labels[item],
            "text": digit_caption(label, variant=item, seed=self.seed),
        }
