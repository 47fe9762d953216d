import numpy as np
import pytest
import torch

from mmlib.data import ATTRIBUTES, DigitsDataset, SceneDataset, World, collate, digit_caption, make_loader
from mmlib.data.dataset import render_batch, split_batch

ALL = ("image", "text", "audio", "mel", "depth", "thermal", "imu", "video")


def test_sample_holds_every_requested_field():
    dataset = SceneDataset("test", size=8, modalities=ALL)
    sample = dataset[3]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["audio"].shape == (8000,)
    assert sample["mel"].shape == (32, 32)
    assert sample["depth"].shape == sample["thermal"].shape == (1, 32, 32)
    assert sample["imu"].shape == (6, 32)
    assert sample["video"].shape == (8, 3, 32, 32)
    assert isinstance(sample["text"], str) and sample["mentioned"].shape == (6,)
    assert set(sample["attributes"]) == set(ATTRIBUTES)
    assert int(sample["index"]) == dataset.index[3]


def test_sample_equals_direct_rendering():
    world = World(seed=0)
    dataset = SceneDataset("val", size=5, modalities=("image", "imu"), world=world)
    assert torch.equal(dataset[4]["image"], torch.from_numpy(world.image(world.split("val", 5)[4:5])[0]))


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_are_the_same_with_or_without_workers(workers):
    dataset = SceneDataset("train", size=40, modalities=("image", "text", "mel"))
    reference = [batch for batch in make_loader(dataset, batch_size=16, shuffle=True, seed=7)]
    batches = [batch for batch in make_loader(dataset, batch_size=16, shuffle=True, seed=7, num_workers=workers)]
    assert [len(b["text"]) for b in batches] == [16, 16, 8]
    for got, want in zip(batches, reference):
        assert torch.equal(got["image"], want["image"]) and torch.equal(got["mel"], want["mel"])
        assert got["text"] == want["text"]
        assert torch.equal(got["attributes"]["color"], want["attributes"]["color"])
    assert batches[0]["image"].shape == (16, 3, 32, 32)


def test_shuffle_depends_on_seed():
    dataset = SceneDataset("train", size=64, modalities=("imu",))
    first = next(iter(make_loader(dataset, batch_size=64, shuffle=True, seed=1)))["index"]
    again = next(iter(make_loader(dataset, batch_size=64, shuffle=True, seed=1)))["index"]
    other = next(iter(make_loader(dataset, batch_size=64, shuffle=True, seed=2)))["index"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_several_captions_per_scene():
    dataset = SceneDataset("train", size=4, modalities=("image", "text"), captions_per_scene=3)
    assert len(dataset) == 12
    a, b = dataset[0], dataset[1]
    assert torch.equal(a["image"], b["image"]) and a["text"] != b["text"]
    assert int(dataset[3]["index"]) == dataset.index[1]


def test_collate_and_split_are_inverse():
    world = World(seed=0)
    batch = render_batch(world, world.split("test", 6), ("image", "text"))
    again = collate(split_batch(batch))
    assert torch.equal(again["image"], batch["image"]) and again["text"] == batch["text"]
    assert torch.equal(again["attributes"]["shape"], batch["attributes"]["shape"])


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown field 'smell'; expected one of: image, text"):
        SceneDataset("train", 4, modalities=("smell",))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        SceneDataset("dev", 4)
    with pytest.raises(IndexError):
        SceneDataset("train", 4)[4]


def test_digits_are_real_captioned_images():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert len(train) == 1297 and len(test) == 500
    sample = test[0]
    assert sample["image"].shape == (3, 32, 32) and 0 <= sample["image"].min() and sample["image"].max() <= 1
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert names[int(sample["label"])] in sample["text"].split()
    assert set(test.labels.tolist()) == set(range(10))
    assert torch.equal(DigitsDataset("test").images, test.images)  # same seed, same split
    assert not torch.equal(DigitsDataset("test", seed=test.seed + 1).labels, test.labels)  # another seed, another split
    assert digit_caption(7) in {t.format(digit="seven") for t in
                                ["a handwritten {digit}", "the digit {digit}", "a scanned {digit}",
                                 "the number {digit} written by hand", "a {digit} drawn with a pen"]}
    with pytest.raises(ValueError, match="unknown split 'val'; expected one of: train, test"):
        DigitsDataset("val")
