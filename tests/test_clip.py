import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig, CLIPImageProcessor, CLIPModel, ClapConfig as HFClapConfig, ClapFeatureExtractor, ClapModel,
)

from mmlib import config as course_config
from mmlib.clip import (
    ClapConfig, ClipConfig, PretrainedClap, PretrainedClip, TrainedEncoders, load_clap, load_clip, train_clip,
    train_digits_clip,
)
from mmlib.data import World


def text_config(tokenizer):
    return dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tiny_clip_folder(tokenizer, tmp_path_factory):
    """A CLIPModel built from a tiny config and saved locally, as a hub checkpoint would be."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(text_config=text_config(tokenizer), projection_dim=16,
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clap_folder(tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clap")
    config = HFClapConfig(text_config=text_config(tokenizer), projection_dim=16,
                          audio_config=dict(spec_size=64, window_size=4, num_mel_bins=32, patch_size=4,
                                            patch_stride=(4, 4), hidden_size=32, depths=[1, 1],
                                            num_attention_heads=[1, 1], patch_embeds_hidden_size=16,
                                            enable_fusion=False))
    ClapModel(config).save_pretrained(folder)
    ClapFeatureExtractor(feature_size=32, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=1024,
                         frequency_max=8000, truncation="rand_trunc", padding="repeatpad").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world_batch():
    world = World(seed=0)
    scenes = world.scenes(world.split("test", 3))
    return torch.from_numpy(world.image(scenes)), torch.from_numpy(world.audio(scenes)), world.captions(scenes)[0]


def test_pretrained_clip_behind_embed(tiny_clip_folder, world_batch):
    images, _, texts = world_batch
    clip = PretrainedClip(str(tiny_clip_folder))
    for modality, batch in (("image", images), ("text", texts)):
        embedding = clip.embed(modality, batch)
        assert embedding.shape == (3, 16) and torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="no 'audio' encoder; it encodes: image, text"):
        clip.embed("audio", images)
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\)"):
        clip.embed("image", images[:, :1])


def test_pretrained_clap_behind_embed(tiny_clap_folder, world_batch):
    _, audio, texts = world_batch
    clap = PretrainedClap(str(tiny_clap_folder), sample_rate=8000)
    for modality, batch in (("audio", audio), ("text", texts)):
        embedding = clap.embed(modality, batch)
        assert embedding.shape == (3, 16) and torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match=r"waveforms \(batch, samples\)"):
        clap.embed("audio", audio[:, None])


def test_configs_with_pretrained_load_checkpoints(tiny_clip_folder, tiny_clap_folder):
    assert isinstance(load_clip(ClipConfig(pretrained=str(tiny_clip_folder))), PretrainedClip)
    assert isinstance(load_clap(ClapConfig(pretrained=str(tiny_clap_folder))), PretrainedClap)


@pytest.mark.parametrize("scale", ["tiny", "small", "full"])
def test_scale_files_validate(scale):
    course_config.check_config_file(scale)
    clip = course_config.scale_config("clip", ClipConfig, scale)
    if scale == "full":
        assert clip.pretrained == "openai/clip-vit-large-patch14"
        assert course_config.scale_config("clap", ClapConfig, scale).pretrained == "laion/clap-htsat-unfused"
    else:
        assert clip.pretrained is None and clip.training.steps > 0


def test_unknown_keys_in_scale_files_are_rejected(tmp_path, monkeypatch):
    (tmp_path / "tiny.yaml").write_text("clip:\n  training: {stpes: 3}\n")
    monkeypatch.setattr(course_config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"'tiny.yaml:clip.training.stpes' for ContrastiveConfig"):
        course_config.scale_config("clip", ClipConfig, "tiny")
    (tmp_path / "tiny.yaml").write_text("clipp: {}\n")
    with pytest.raises(ValueError, match="unknown section 'clipp'; known sections: .*clip"):
        course_config.check_config_file("tiny")


def test_short_clip_run_learns_and_round_trips(tokenizer, tmp_path, world_batch):
    config = course_config.make_config(ClipConfig, {"training": {"steps": 40, "batch_size": 32}})
    trained = train_clip(config, tokenizer, World(seed=0))
    losses = trained.history.loss["image-text"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    trained.save(tmp_path)
    again = TrainedEncoders.load(tmp_path)
    images, _, texts = world_batch
    assert torch.allclose(again.encoders.embed("image", images), trained.encoders.embed("image", images))
    assert torch.allclose(again.encoders.embed("text", texts), trained.encoders.embed("text", texts))
    assert again.history.loss == trained.history.loss
    assert again.logit_scales["image-text"].temperature == pytest.approx(trained.logit_scales["image-text"].temperature)


def test_digits_recipe_runs(tokenizer):
    trained = train_digits_clip(ClipConfig(), tokenizer, steps=20)
    assert trained.history.steps == 20 and trained.encoders.modalities == ["image", "text"]
