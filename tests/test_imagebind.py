import numpy as np
import pytest
import torch

from mmlib import config as course_config
from mmlib.clip import ClipConfig, TrainedEncoders, train_clip
from mmlib.data import World
from mmlib.encoders import ConvEncoderConfig, ImuEncoderConfig, build_encoders, tower_spec
from mmlib.imagebind import BOUND_MODALITIES, ImageBindConfig, bind_to_images, shared_attributes

TINY = {"training": {"steps": 25, "batch_size": 32}}


@pytest.fixture(scope="module")
def clip(tokenizer):
    config = course_config.make_config(ClipConfig, {"training": {"steps": 30, "batch_size": 32}})
    return train_clip(config, tokenizer, World(seed=0)).encoders


@pytest.fixture(scope="module")
def bound(clip):
    return bind_to_images(clip, course_config.make_config(ImageBindConfig, TINY), World(seed=0))


@pytest.fixture(scope="module")
def batch():
    world = World(seed=0)
    scenes = world.scenes(world.split("test", 3))
    return {m: torch.from_numpy(world.render(m, scenes)) for m in ("image",) + BOUND_MODALITIES}


def test_every_modality_lands_in_one_space(bound, batch):
    assert set(bound.encoders.modalities) == {"image", "text", *BOUND_MODALITIES}
    for modality, data in batch.items():
        embedding = bound.encoders.embed(modality, data)
        assert embedding.shape == (3, 64) and torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)


def test_image_and_text_stay_frozen(clip, bound):
    for frozen in ("image", "text"):
        mine, theirs = bound.encoders.towers[frozen].state_dict(), clip.towers[frozen].state_dict()
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), frozen


def test_each_pair_has_its_temperature_and_learns(bound):
    assert set(bound.logit_scales) == {f"{m}-image" for m in BOUND_MODALITIES}
    for name, losses in bound.history.loss.items():
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), name


def test_round_trip(bound, batch, tmp_path):
    bound.save(tmp_path)
    again = TrainedEncoders.load(tmp_path)
    for modality, data in batch.items():
        assert torch.allclose(again.encoders.embed(modality, data), bound.encoders.embed(modality, data))


def test_wrong_shapes_name_the_expected_shape(bound, batch):
    encoders = bound.encoders
    with pytest.raises(ValueError, match=r"depth batch must have shape \(batch, 1, 32, 32\); got \(3, 3, 32, 32\)"):
        encoders.embed("depth", batch["image"])
    with pytest.raises(ValueError, match=r"imu batch must have shape \(batch, 6, 32\); got \(3, 6, 16\)"):
        encoders.embed("imu", batch["imu"][:, :, :16])
    with pytest.raises(ValueError, match=r"video batch must have shape \(batch, 8, 3, 32, 32\); got \(3, 4, 3, 32, 32\)"):
        encoders.embed("video", batch["video"][:, :4])
    with pytest.raises(ValueError, match=r"thermal batch must have shape \(batch, 1, 32, 32\)"):
        encoders.embed("thermal", batch["thermal"][:, 0])


def test_binding_rejects_unknown_modalities(clip):
    with pytest.raises(ValueError, match="unknown bindable modality 'smell'; expected one of: audio, depth"):
        bind_to_images(clip, course_config.make_config(ImageBindConfig, TINY), World(seed=0), modalities=("smell",))


def test_shared_attributes():
    assert shared_attributes("image", "imu") == ("motion", "temperature")
    assert shared_attributes("audio", "imu") == ("motion",)
    assert shared_attributes("depth", "thermal") == ("shape", "size", "position")
    assert shared_attributes("depth", "imu") == ()


def test_imu_and_video_towers_alone(tokenizer):
    encoders = build_encoders({"imu": tower_spec("imu", ImuEncoderConfig()),
                               "video": tower_spec("conv", ConvEncoderConfig(in_channels=3, frames=8))}).eval()
    assert encoders.embed("imu", torch.randn(2, 6, 32)).shape == (2, 64)
    assert encoders.embed("video", torch.rand(2, 8, 3, 32, 32)).shape == (2, 64)


def test_pairwise_recall_and_zero_shot_tables(bound):
    from mmlib.imagebind import pairwise_recall, zero_shot_table

    world = World(seed=0)
    scenes = world.scenes(world.split("test", 40))
    modalities = ("image", "text", "depth", "imu")
    recall = pairwise_recall(bound.encoders, world, scenes, modalities)
    assert recall.shape == (4, 4) and np.isnan(np.diag(recall)).all()
    assert np.isnan(recall[2, 3]) and np.isnan(recall[3, 2])  # depth and IMU share nothing
    assert np.isfinite(recall[0, 1]) and 0 <= recall[0, 1] <= 1
    table = zero_shot_table(bound.encoders, world, scenes, ("depth", "imu"))
    assert set(table["depth"]) == {"shape", "size", "position"} and set(table["imu"]) == {"motion", "temperature"}
