"""The generated world every lesson shares, and the real-data companion (handwritten digits).

Introduced in `00_tour.ipynb`; see ``data/README.md`` for the datasheet.
"""

from mmlib.data.captions import corpus_words, parse_caption
from mmlib.data.dataset import FIELDS, SceneDataset, collate, make_loader, render_batch
from mmlib.data.digits import DigitsDataset, digit_caption
from mmlib.data.world import (
    ATTRIBUTES,
    HELDOUT_PAIRS,
    MODALITIES,
    REVEALS,
    SPLITS,
    Scenes,
    World,
    WorldConfig,
    split_of,
    value_id,
)

__all__ = [
    "ATTRIBUTES",
    "FIELDS",
    "HELDOUT_PAIRS",
    "MODALITIES",
    "REVEALS",
    "SPLITS",
    "DigitsDataset",
    "SceneDataset",
    "Scenes",
    "World",
    "WorldConfig",
    "collate",
    "corpus_words",
    "digit_caption",
    "make_loader",
    "parse_caption",
    "render_batch",
    "split_of",
    "value_id",
]
