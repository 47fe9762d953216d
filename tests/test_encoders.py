import pytest
import torch

from mmlib.data import World
from mmlib.encoders import (
    ConvEncoderConfig, EncoderSet, TextEncoderConfig, build_encoders, count_parameters, tower_spec,
)


@pytest.fixture(scope="module")
def encoders(tokenizer):
    torch.manual_seed(0)
    return build_encoders({
        "image": tower_spec("conv", ConvEncoderConfig()),
        "audio": tower_spec("audio", ConvEncoderConfig(in_channels=1)),
        "text": tower_spec("text", TextEncoderConfig()),
    }, tokenizer).eval()


@pytest.fixture(scope="module")
def batch():
    world = World(seed=0)
    scenes = world.scenes(world.split("test", 4))
    waveform = world.audio(scenes)
    return {
        "image": torch.from_numpy(world.image(scenes)),
        "audio": torch.from_numpy(waveform),
        "mel": torch.from_numpy(world.log_mel(waveform)),
        "text": world.captions(scenes)[0],
    }


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_embed_gives_unit_vectors_in_one_space(encoders, batch, modality):
    embedding = encoders.embed(modality, batch[modality])
    assert embedding.shape == (4, 64)
    assert torch.allclose(embedding.norm(dim=1), torch.ones(4), atol=1e-5)


def test_audio_accepts_waveforms_or_log_mels(encoders, batch):
    assert torch.allclose(encoders.embed("audio", batch["audio"]), encoders.embed("audio", batch["mel"]), atol=1e-5)


def test_single_string_is_a_batch_of_one(encoders):
    assert encoders.embed("text", "a red circle").shape == (1, 64)


def test_bad_inputs_name_what_was_expected(encoders, batch):
    with pytest.raises(ValueError, match="has no 'depth' encoder; it encodes: image, audio, text"):
        encoders.embed("depth", batch["image"])
    with pytest.raises(ValueError, match=r"image batch must have shape \(batch, 3, 32, 32\); got \(4, 1, 32, 32\)"):
        encoders.embed("image", batch["image"][:, :1])
    with pytest.raises(TypeError, match="must hold floats, got torch.uint8"):
        encoders.embed("image", (batch["image"] * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"waveforms \(batch, 8000\) or log-mel spectrograms \(batch, 32, 32\)"):
        encoders.embed("audio", batch["audio"][:, :4000])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        encoders.embed("image", batch["image"].numpy())
    with pytest.raises(TypeError, match="list of strings"):
        encoders.embed("text", [1, 2])


def test_text_pooling_choices(tokenizer):
    eos = build_encoders({"text": tower_spec("text", TextEncoderConfig(pooling="eos"))}, tokenizer)
    assert eos.embed("text", ["a red circle", "a blue one"]).shape == (2, 64)
    with pytest.raises(ValueError, match="unknown pooling 'max'; expected one of: mean, eos"):
        build_encoders({"text": tower_spec("text", TextEncoderConfig(pooling="max"))}, tokenizer)


def test_token_states_for_decoders(encoders):
    states, mask = encoders.towers["text"].token_states(["a red circle", "there is a small blue square"])
    assert states.shape == (2, 8, 64) and mask.shape == (2, 8) and mask[0].sum() == 5


def test_text_encoder_pools_at_the_tokenizers_end_token(encoders, tokenizer):
    transformer = encoders.towers["text"].transformer
    assert transformer.config.eos_token_id == tokenizer.eos_token_id != 2


def test_save_and_load_round_trip(encoders, batch, tmp_path):
    encoders.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"encoders.safetensors", "encoders.json", "tokenizer"}
    again = EncoderSet.load(tmp_path)
    for modality in ("image", "audio", "text"):
        assert torch.allclose(again.embed(modality, batch[modality]), encoders.embed(modality, batch[modality]))


def test_build_rejects_unknown_keys_with_their_path(tokenizer):
    with pytest.raises(ValueError, match=r"'image.config.widht' for ConvEncoderConfig"):
        build_encoders({"image": {"kind": "conv", "config": {"widht": 8}}})
    with pytest.raises(ValueError, match="unknown tower kind 'vit'"):
        build_encoders({"image": {"kind": "vit"}})
    with pytest.raises(ValueError, match="needs the course tokenizer"):
        build_encoders({"text": {"kind": "text"}})


def test_parameter_counts(encoders):
    total = count_parameters(encoders)
    assert 1_000_000 < total < 2_000_000
    assert count_parameters(encoders, trainable_only=True) == total
