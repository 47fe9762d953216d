import numpy as np
import pytest
import torch
import yaml
from diffusers import AudioLDMPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

from mmlib import config as course_config
from mmlib.autoencoder import AutoencoderConfig, build_autoencoder
from mmlib.data import World
from mmlib.decoders import (CONFIGS, Decoder, assemble, griffin_lim, load_decoder, mel_to_linear, snapshot_prompts,
                            train_decoder)
from mmlib.diffusion import DiffusionConfig, build_unet, inflate, noise_scheduler
from mmlib.encoders import TextEncoder, TextEncoderConfig

from conftest import tiny_config  # tests/conftest.py: the tiny decoder configs the fixtures use

def test_decoders_return_the_worlds_formats(decoders):
    prompts = ["a large red circle in the top left", "a small blue square moving leftward"]
    assert decoders["image"](prompts).shape == (2, 3, 32, 32)
    clips = decoders["video"](prompts)
    assert clips.shape == (2, 8, 3, 32, 32) and 0 <= clips.min() and clips.max() <= 1
    assert decoders["audio"](prompts).shape == (2, 8000)
    assert decoders["audio"](prompts, vocode=False).shape == (2, 32, 32)  # log-mels before the vocoder


def test_training_keeps_losses_and_snapshots(decoders):
    image = decoders["image"]
    assert len(image.losses) == 6 and sorted(image.snapshots) == [3, 6]
    prompts, scenes = snapshot_prompts("image", World(seed=0))
    assert image.snapshots[6].shape == (len(prompts), 3, 32, 32) and len(scenes) == len(prompts)


def test_prompt_embeds_give_the_same_output_as_prompts(decoders):
    for modality in ("image", "video"):
        decoder = decoders[modality]
        prompts = ["a small green triangle in the bottom right", "a large purple cross"]
        from_text = decoder(prompts, seed=3)
        from_embeds = decoder(prompt_embeds=decoder.prompt_embeds(prompts), seed=3)
        assert torch.allclose(from_text, from_embeds, atol=1e-5)
        assert not torch.allclose(from_text, decoder(prompts, seed=4), atol=1e-3)  # the seed matters


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_one_seed_per_output_makes_an_output_independent_of_its_batch(decoders, modality):
    def decode(prompts, **options):  # sounds: the log-mels the diffusion made (the vocoder's phases are drawn per batch)
        return decoders[modality](prompts, **options, **({"vocode": False} if modality == "audio" else {}))

    def same(a, b):  # equal up to batched float arithmetic (log-mels are around -5)
        return torch.allclose(a, b, rtol=1e-4, atol=1e-4)

    prompts = ["a small green triangle in the bottom right", "a large purple cross", "a red circle moving up"]
    alone = decode(prompts[2:], seed=[7])[0]
    assert same(decode(prompts, seed=[5, 6, 7])[2], alone)
    assert same(decode(prompts[::-1], seed=[7, 6, 5])[0], alone)
    assert same(decode(prompts, seed=[5, 6, 7], batch_size=2)[2], alone)  # across chunks
    assert (decode(prompts, seed=0)[2] - alone).abs().max() > 0.01  # one seed: the noise depends on batch place
    with pytest.raises(ValueError, match="2 seeds for 3 outputs"):
        decode(prompts, seed=[1, 2])


def test_wrong_prompt_embeds_name_the_expected_shape(decoders):
    decoder = decoders["image"]
    assert decoder.conditioning_shape == (32, 16)
    for wrong in (torch.zeros(2, 77, 16), torch.zeros(2, 32, 768), torch.zeros(32, 16)):
        with pytest.raises(ValueError, match=r"\(batch, 32, 16\)"):
            decoder(prompt_embeds=wrong)
    with pytest.raises(ValueError, match="either prompts"):
        decoder(["a red circle"], prompt_embeds=torch.zeros(1, 32, 16))


def test_no_prompts_or_a_step_count_below_one_is_refused(decoders):
    decoder = decoders["image"]
    with pytest.raises(ValueError, match="no prompts to decode"):
        decoder([])
    for steps in (0, -1, 2.5):
        with pytest.raises(ValueError, match=rf"steps is the number of sampler steps, a positive integer; got {steps}"):
            decoder(["a red circle"], steps=steps)


def test_unknown_sampler_in_a_config_lists_the_valid_ones(decoders, text, vaes):
    decoder = decoders["image"]
    bad = tiny_config("image", sampler="plms")
    with pytest.raises(ValueError, match="ddim, dpm, euler, ddpm"):
        assemble("image", vaes["image"], text.transformer, text.tokenizer, decoder.pipeline.unet,
                 noise_scheduler("sample"), bad)


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_save_and_load_give_the_same_decoder(decoders, modality, tmp_path):
    decoder = decoders[modality]
    decoder.save(tmp_path)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))  # no pickles
    loaded = Decoder.load(tmp_path)
    prompts = ["a small orange circle moving up"]
    options = {"vocode": False} if modality == "audio" else {}
    assert torch.allclose(decoder(prompts, **options), loaded(prompts, **options), atol=1e-5)
    assert loaded.losses == decoder.losses and sorted(loaded.snapshots) == sorted(decoder.snapshots)



def test_a_video_decoder_loads_with_the_temporal_layers_it_was_saved_with(decoders, tmp_path):
    import json

    world = World(seed=0)
    plain = train_decoder("video", tiny_config("video", temporal_text=False, snapshots=[]), world,
                          image_decoder=decoders["image"])
    for name, decoder in (("reads", decoders["video"]), ("plain", plain)):
        decoder.save(tmp_path / name)
        crossing = [m.is_cross_attention for n, m in Decoder.load(tmp_path / name).pipeline.unet.named_modules()
                    if "temp_attentions" in n and n.endswith("attn2")]
        assert crossing and all(crossing) == (name == "reads") and any(crossing) == (name == "reads")
    meta = json.loads((tmp_path / "plain" / "decoder.json").read_text())
    meta["config"]["temporal_text"] = True  # a decoder.json that does not match its weights
    (tmp_path / "plain" / "decoder.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="temporal_text"):
        Decoder.load(tmp_path / "plain")
    del meta["config"]["temporal_text"]  # saved before the option existed: diffusers' own UNet3D
    (tmp_path / "plain" / "decoder.json").write_text(json.dumps(meta))
    prompts = ["a small orange circle standing still"]
    assert torch.allclose(Decoder.load(tmp_path / "plain")(prompts), plain(prompts), atol=1e-5)

def test_the_zoos_decoders_sample_as_the_config_says_now(decoders, tmp_path, monkeypatch):
    from diffusers import DPMSolverMultistepScheduler

    from mmlib import zoo
    from mmlib.decoders import load_zoo_decoder

    decoders["image"].save(tmp_path / "saved")
    before = zoo.folder("image-decoder"), zoo.folder("stage2")
    settings = yaml.safe_load((course_config.CONFIG_DIR / "tiny.yaml").read_text())  # the tiny file, edited
    mine = tmp_path / "mine.yaml"
    settings["image_decoder"] = {"sampler": "dpm", "inference_steps": 3, "guidance_scale": 1.5}
    mine.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("MMLIB_CONFIG_FILE", str(mine))
    assert (zoo.folder("image-decoder"), zoo.folder("stage2")) == before, "sampling settings retrain nothing"
    loaded = load_zoo_decoder(tmp_path / "saved")
    assert (loaded.config.sampler, loaded.config.inference_steps, loaded.config.guidance_scale) == ("dpm", 3, 1.5)
    assert isinstance(loaded.pipeline.scheduler, DPMSolverMultistepScheduler)
    assert loaded.config.unet == decoders["image"].config.unet, "what was trained stays as it was"
    assert loaded(["a small orange circle"]).shape == decoders["image"](["a small orange circle"]).shape
    settings["image_decoder"]["unet"] = {"steps": 7}  # a training setting: a new decoder, so a new stage 2
    mine.write_text(yaml.safe_dump(settings))
    assert zoo.folder("image-decoder") != before[0] and zoo.folder("stage2") != before[1]


def test_griffin_lim_resynthesises_pitch_and_loudness():
    world = World(seed=0)
    scenes = world.compose(2, shape="circle", color="red", size="large", motion="still")
    mels = torch.from_numpy(world.log_mel(world.audio(scenes)))
    filters = torch.from_numpy(__import__("mmlib.data.sound", fromlist=["x"]).mel_filters(world.config).T)
    linear = mel_to_linear(mels)
    projected = torch.einsum("mf,bft->bmt", filters, linear)
    assert ((projected - mels.exp()).norm() / mels.exp().norm()) < 0.05  # its mel projection matches
    waves = griffin_lim(mels)
    assert waves.shape == (2, 8000)
    spectrum = np.abs(np.fft.rfft(waves[0].numpy()))
    assert abs(np.argmax(spectrum) - 196) <= 3  # red is G3, 196 Hz (1 Hz per bin for a 1 s clip)
    assert torch.allclose(torch.from_numpy(world.log_mel(waves.numpy())).mean(), mels.mean(), atol=0.5)


def test_full_scale_configs_name_the_real_pipelines():
    full = yaml.safe_load(open("configs/full.yaml"))
    assert full["image_decoder"]["pretrained"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert full["audio_decoder"]["pretrained"] == "cvssp/audioldm-s-full-v2"
    assert full["video_decoder"]["pretrained"] == "cerspense/zeroscope_v2_576w"
    for modality in ("image", "audio", "video"):
        config = course_config.scale_config(f"{modality}_decoder", CONFIGS[modality], "full")
        assert config.pretrained == full[f"{modality}_decoder"]["pretrained"]


@pytest.mark.parametrize("modality", ["image", "video"])
def test_full_scale_path_loads_saved_sd_and_zeroscope_pipelines(decoders, modality, tmp_path):
    """Decoder.from_pretrained on a folder saved with save_pretrained (the hub ids take the same path)."""
    pipeline = decoders[modality].pipeline
    if modality == "video":  # a UNet3D as diffusers builds it, as Zeroscope's is (the tiny one reads text in time)
        pipeline = type(pipeline)(**{**pipeline.components, "unet": inflate(decoders["image"].pipeline.unet)})
    pipeline.save_pretrained(tmp_path)
    config = tiny_config(modality, pretrained=str(tmp_path), sampler="dpm")
    loaded = load_decoder(modality, config)
    assert type(loaded.pipeline) is type(decoders[modality].pipeline)
    assert type(loaded.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert loaded.config.pretrained == str(tmp_path)
    assert loaded(["a red circle"], steps=2).shape[0] == 1


def test_full_scale_path_loads_a_saved_audioldm(tokenizer, tmp_path):
    """A tiny AudioLDM (CLAP text encoder, projection-conditioned UNet, HiFi-GAN vocoder), saved and loaded."""
    torch.manual_seed(0)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        projection_dim=8, max_position_embeddings=tokenizer.model_max_length + 4, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=(8, 16),
                                class_embed_type="simple_projection", projection_class_embeddings_input_dim=8,
                                class_embeddings_concat=True)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=16, sampling_rate=16000, upsample_initial_channel=8,
                                                    upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                                                    resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
                                                    normalize_before=False))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                     vocoder=vocoder).save_pretrained(tmp_path)
    decoder = Decoder.from_pretrained("audio", str(tmp_path))
    assert decoder.conditioning_shape == (1, 8)  # AudioLDM conditions on one projected CLAP vector
    assert decoder.prompt_embeds(["a red circle"]).shape == (1, 8)
    waves = decoder(["a red circle", "a loud blue square"], steps=2)
    assert waves.ndim == 2 and waves.shape[0] == 2
    with pytest.raises(ValueError, match=r"\(batch, 8\)"):
        decoder(prompt_embeds=torch.zeros(2, 32, 16))


def test_unknown_decoder_modality_lists_the_outputs():
    with pytest.raises(ValueError, match="image, audio, video"):
        load_decoder("depth")
    with pytest.raises(ValueError, match="image, audio, video"):
        Decoder.from_pretrained("thermal", "nowhere")


def test_video_decoder_is_the_image_decoder_inflated_and_trains_only_time(decoders):
    image = decoders["image"].pipeline.unet.state_dict()
    video = decoders["video"].pipeline.unet.state_dict()
    for name, value in image.items():  # every image weight is there, unchanged
        assert torch.equal(value.reshape(video[name].shape), video[name]), name
    temporal_out = [value for name, value in video.items() if "temp_attentions" in name and "proj_out.weight" in name]
    assert temporal_out and all(value.abs().sum() > 0 for value in temporal_out)  # zero at inflation, trained since
    # the image layers were frozen for training (no gradients computed); the result is handed back as a loaded one is
    assert all(p.requires_grad for p in decoders["video"].pipeline.unet.parameters())


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_decoder_text_is_what_the_zoo_decoder_attends_to(modality):
    # Stages 2 and 3 train against DecoderText while the UNets train: it must give exactly the
    # trained decoder's conditioning, or the saved projectors would not fit the decoder they load over.
    from mmlib import zoo
    from mmlib.decoders import DecoderText

    prompts = ["a large red circle in the top left", "a quiet low hum moving leftward, small and blue"]
    text, decoder = DecoderText(modality), zoo.load(f"{modality}-decoder")
    assert text.conditioning_shape == decoder.conditioning_shape
    assert torch.equal(text.prompt_embeds(prompts), decoder.prompt_embeds(prompts))


def test_stages_link_to_text_encoders_alone_unless_the_unets_run():
    from mmlib.decoders import DecoderText, decoders_to_link

    assert isinstance(decoders_to_link(["image"], unets=False)["image"], DecoderText)
    assert isinstance(decoders_to_link(["image"], unets=True)["image"], Decoder)
