"""PyTorch access to the generated world: a Dataset of scenes, a collate function, a DataLoader.

Introduced in `00_tour.ipynb`. The Dataset renders whole batches at once (``__getitems__``), so a
DataLoader with or without workers is as fast as the vectorised renderers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mmlib import config as course_config
from mmlib.data.world import ATTRIBUTES, MODALITIES, World, check_choice

# What a sample can hold besides the seven modalities: "mel" is the log-mel spectrogram of "audio".
FIELDS = MODALITIES + ("mel",)


def render_batch(world: World, index: np.ndarray, fields, caption_variant=0, mention="random") -> dict:
    """Render `fields` for the scenes at `index` as a batch dict of tensors (text as a list).

    Always present: ``index`` (B,) and ``attributes`` (name -> (B,) value ids). With ``text``
    comes ``mentioned``, a (B, 6) bool tensor of the attributes each caption states.
    """
    for name in fields:
        check_choice("field", name, FIELDS)
    scenes = world.scenes(index)
    batch = {
        "index": torch.as_tensor(scenes.index),
        "attributes": {name: torch.as_tensor(values) for name, values in scenes.attributes.items()},
    }
    if "audio" in fields or "mel" in fields:
        waveform = world.audio(scenes)
        if "audio" in fields:
            batch["audio"] = torch.from_numpy(waveform)
        if "mel" in fields:
            batch["mel"] = torch.from_numpy(world.log_mel(waveform))
    for name in ("image", "depth", "thermal", "imu", "video"):
        if name in fields:
            batch[name] = torch.from_numpy(getattr(world, name)(scenes))
    if "text" in fields:
        texts, mentioned = world.captions(scenes, variant=caption_variant, mention=mention)
        batch["text"] = texts
        batch["mentioned"] = torch.from_numpy(mentioned)
    return batch


class SceneDataset(Dataset):
    """`size` scenes of one split, each a dict with the requested modalities.

    With ``captions_per_scene=k`` every scene appears k times, each time with another caption.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 1000,
        modalities=("image", "text"),
        world: World | None = None,
        captions_per_scene: int = 1,
        mention: str = "random",
    ) -> None:
        self.world = world or World()
        self.index = self.world.split(split, size)
        self.fields = tuple(check_choice("field", name, FIELDS) for name in modalities)
        self.split = split
        self.captions_per_scene = captions_per_scene
        self.mention = mention

    def __len__(self) -> int:
        return len(self.index) * self.captions_per_scene

    def __getitems__(self, items) -> list[dict]:
        """Render several samples in one vectorised call (used by DataLoader's batch fetch)."""
        items = np.asarray(items, dtype=np.int64)
        if items.size and (items.min() < -len(self) or items.max() >= len(self)):
            raise IndexError(f"SceneDataset index out of range (length {len(self)})")
        items = items % len(self)
        scene_rows, variant = np.divmod(items, self.captions_per_scene) if self.captions_per_scene > 1 else (items, 0)
        batch = render_batch(self.world, self.index[scene_rows], self.fields, variant, self.mention)
        return split_batch(batch)

    def __getitem__(self, item: int) -> dict:
        return self.__getitems__([item])[0]


def split_batch(batch: dict) -> list[dict]:
    """The inverse of `collate`: a batch dict into a list of per-sample dicts."""
    size = len(batch["index"])
    samples = []
    for i in range(size):
        sample = {}
        for key, value in batch.items():
            sample[key] = {k: v[i] for k, v in value.items()} if isinstance(value, dict) else value[i]
        samples.append(sample)
    return samples


def collate(samples: list[dict]) -> dict:
    """Stack per-sample dicts into a batch: tensors stacked, strings listed, dicts recursed."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch = {}
    for key, first in samples[0].items():
        values = [sample[key] for sample in samples]
        if isinstance(first, dict):
            batch[key] = collate(values)
        elif isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def make_loader(dataset: Dataset, batch_size: int = 64, shuffle: bool = False, num_workers: int = 0,
                seed: int | None = None, **kwargs) -> DataLoader:
    """A DataLoader over `dataset` with the course's collate and a seeded shuffle."""
    seed = course_config.seed() if seed is None else seed
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=generator,
        persistent_workers=False,
        **kwargs,
    )


def attribute_names(batch: dict, attribute: str) -> list[str]:
    """The value names of one attribute in a collated batch."""
    check_choice("attribute", attribute, list(ATTRIBUTES))
    return [ATTRIBUTES[attribute][int(i)] for i in batch["attributes"][attribute]]
