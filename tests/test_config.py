from dataclasses import dataclass

import pytest
import torch

from mmlib import config


def test_defaults(monkeypatch):
    monkeypatch.delenv("MMLIB_SCALE", raising=False)
    monkeypatch.delenv("MMLIB_SEED", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.scale() == "tiny"
    assert config.seed() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a Colab GPU: the small configs
    assert config.scale() == "small"
    monkeypatch.setenv("MMLIB_SCALE", "tiny")
    assert config.scale() == "tiny"


def test_scale_and_seed_from_environment(monkeypatch):
    monkeypatch.setenv("MMLIB_SCALE", "full")
    monkeypatch.setenv("MMLIB_SEED", "42")
    assert config.scale() == "full"
    assert config.seed() == 42
    assert "scale=full seed=42" in config.describe()


def test_unknown_scale_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("MMLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="valid scales: tiny, small, full"):
        config.scale()


@pytest.mark.parametrize("text", ["abc", "-1", "1.5"])
def test_bad_seed(monkeypatch, text):
    monkeypatch.setenv("MMLIB_SEED", text)
    with pytest.raises(ValueError, match="MMLIB_SEED must be a non-negative integer"):
        config.seed()


def test_device_override(monkeypatch):
    monkeypatch.setenv("MMLIB_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")
    monkeypatch.setenv("MMLIB_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="MMLIB_DEVICE"):
        config.device()


def test_seed_everything_makes_torch_repeatable():
    config.seed_everything(3)
    first = torch.rand(4)
    config.seed_everything(3)
    assert torch.equal(first, torch.rand(4))


@dataclass
class Example:
    width: int = 8  # a documented default
    depth: int = 2


def test_make_config_accepts_known_keys():
    assert config.make_config(Example, width=4) == Example(width=4, depth=2)
    assert config.make_config(Example, {"depth": 5}) == Example(depth=5)


def test_make_config_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'widht' for Example; valid keys: width, depth"):
        config.make_config(Example, widht=4)


@dataclass
class Outer:
    inner: Example = None
    name: str = "x"


def test_make_config_builds_nested_dataclasses_and_names_the_bad_key_path():
    built = config.make_config(Outer, {"inner": {"width": 3}})
    assert built.inner == Example(width=3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'inner.widht' for Example; valid keys: width, depth"):
        config.make_config(Outer, {"inner": {"widht": 3}})


def test_nested_overrides_keep_the_fields_own_defaults():
    """A section that names one key of a nested config keeps the rest of that field's default."""
    from mmlib.decoders import VideoDecoderConfig

    video = config.make_config(VideoDecoderConfig, {"unet": {"steps": 5}})
    default = VideoDecoderConfig()
    assert video.unet.steps == 5
    assert (video.unet.batch_size, video.unet.lr, video.unet.training_scenes) == \
        (default.unet.batch_size, default.unet.lr, default.unet.training_scenes) == (16, 3e-3, 4096)
    with pytest.raises(ValueError, match="unet.stpes"):
        config.make_config(VideoDecoderConfig, {"unet": {"stpes": 5}})


def test_on_training_device_changes_nothing_on_a_cpu(monkeypatch):
    monkeypatch.setenv("MMLIB_DEVICE", "cpu")
    layer = torch.nn.Linear(2, 2)
    weight = layer.weight
    with config.on_training_device(layer) as device:
        assert device == torch.device("cpu") and layer.weight is weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checked on the device machine)")
def test_lesson_loops_train_on_the_gpu_and_hand_back_cpu_modules(monkeypatch):
    from mmlib.data import World
    from mmlib.judge import JudgeConfig, train_classifier

    monkeypatch.delenv("MMLIB_DEVICE", raising=False)
    layer = torch.nn.Linear(2, 2)
    with config.on_training_device(layer) as device:
        assert device.type == "cuda" and layer.weight.device.type == "cuda"
        with config.on_cpu(layer):  # an evaluation or a sample in the middle of training
            assert layer.weight.device.type == "cpu"
        assert layer.weight.device.type == "cuda"
    assert layer.weight.device.type == "cpu"
    model = train_classifier("image", JudgeConfig(), World(seed=0), steps=3)
    assert all(p.device.type == "cpu" for p in model.parameters())
