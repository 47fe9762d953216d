import math

import pytest
import torch

from mmlib import config as course_config
from mmlib.autoencoder import (AudioAutoencoderConfig, AutoencoderConfig, build_autoencoder, decode, encode, from_vae,
                               psnr, to_vae, train_autoencoder)
from mmlib.data import World
from mmlib.diffusion import (SAMPLERS, DiffusionConfig, build_unet, denoising_loss, inflate, noise_scheduler,
                             sampling_scheduler, train_denoiser)

TINY_UNET = DiffusionConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4, steps=30,
                            batch_size=8)


def test_vae_ranges_round_trip():
    world = World(seed=0)
    scenes = world.scenes(world.split("test", 4))
    pictures = torch.from_numpy(world.image(scenes))
    assert torch.allclose(from_vae("image", to_vae("image", pictures)), pictures, atol=1e-6)
    mels = torch.from_numpy(world.log_mel(world.audio(scenes)))
    vae_mels = to_vae("audio", mels)
    assert vae_mels.shape == (4, 1, 32, 32) and vae_mels.abs().max() <= 1
    assert torch.allclose(from_vae("audio", vae_mels), mels, atol=1e-4)  # the world's log-mels fit the range
    with pytest.raises(ValueError, match="image, audio"):
        to_vae("depth", pictures)


def test_psnr_matches_its_definition():
    reference = torch.zeros(2, 3, 4, 4)
    assert psnr(reference, reference + 0.1) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert psnr(reference, reference + 0.1, peak=2.0) == pytest.approx(20 + 20 * math.log10(2))


def test_autoencoder_compresses_32x32_to_8x8x4_and_learns():
    vae = build_autoencoder(AutoencoderConfig())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vae.encode(x).latent_dist.mean.shape == (2, 4, 8, 8)
    config = course_config.make_config(AudioAutoencoderConfig, steps=60, batch_size=16,
                                       block_out_channels=(8, 8, 8))
    world = World(seed=0)
    trained = train_autoencoder("audio", config, world)
    scenes = world.scenes(world.split("test", 64))
    mels = to_vae("audio", torch.from_numpy(world.log_mel(world.audio(scenes))))
    latents = encode(trained, mels)
    assert latents.std().item() == pytest.approx(1.0, abs=0.25)  # scaling_factor gives unit-variance latents
    untrained = build_autoencoder(config)
    untrained.register_to_config(scaling_factor=1.0)
    assert psnr(mels, decode(trained, latents), 2.0) > psnr(mels, decode(untrained, encode(untrained, mels)), 2.0) + 5


def test_forward_process_and_targets_follow_the_equations():
    scheduler = noise_scheduler("epsilon")
    z0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    abar = torch.cumprod(1 - scheduler.betas, 0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(scheduler.add_noise(z0, noise, t), abar.sqrt() * z0 + (1 - abar).sqrt() * noise, atol=1e-5)
    velocity = noise_scheduler("v_prediction").get_velocity(z0, noise, t)
    assert torch.allclose(velocity, abar.sqrt() * noise - (1 - abar).sqrt() * z0, atol=1e-5)


class Oracle(torch.nn.Module):
    """A 'UNet' that returns whatever it is told: the loss must be zero for the right target."""

    def __init__(self):
        super().__init__()
        self.answer = None

    def forward(self, noisy, times, encoder_hidden_states):
        return type("Out", (), {"sample": self.answer})()


@pytest.mark.parametrize("kind", ["sample", "epsilon", "v_prediction"])
def test_denoising_loss_scores_the_configured_target(kind):
    z0 = torch.randn(4, 4, 8, 8)
    scheduler, oracle = noise_scheduler(kind), Oracle()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(z0.shape, generator=generator)
    times = torch.randint(0, 1000, (4,), generator=generator)
    oracle.answer = {"sample": z0, "epsilon": noise, "v_prediction": scheduler.get_velocity(z0, noise, times)}[kind]
    assert denoising_loss(oracle, scheduler, z0, torch.zeros(4, 2, 8), torch.Generator().manual_seed(0)) < 1e-10
    oracle.answer = torch.zeros_like(z0)
    assert denoising_loss(oracle, scheduler, z0, torch.zeros(4, 2, 8), torch.Generator().manual_seed(0)) > 0.1


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="ddim, dpm, euler, ddpm"):
        sampling_scheduler(noise_scheduler(), "plms")
    with pytest.raises(ValueError, match="sample, epsilon, v_prediction"):
        noise_scheduler("x0")
    for name in SAMPLERS:  # every listed sampler builds from the training schedule and keeps its target
        assert sampling_scheduler(noise_scheduler("sample"), name).config.prediction_type == "sample"


@pytest.mark.parametrize("video", [False, True])
def test_unets_denoise_image_and_clip_latents(video):
    unet = build_unet(TINY_UNET, 4, 8, 16, video=video)
    shape = (2, 4, 3, 8, 8) if video else (2, 4, 8, 8)
    out = unet(torch.randn(shape), torch.tensor([10, 900]), encoder_hidden_states=torch.randn(2, 5, 16)).sample
    assert out.shape == shape


def test_train_denoiser_lowers_the_loss_and_is_seeded():
    latents = torch.randn(64, 4, 8, 8)
    captions = lambda rows, step: ["a caption"] * len(rows)  # noqa: E731
    encode_text = lambda texts: torch.ones(len(texts), 3, 16)  # noqa: E731
    runs = []
    for _ in range(2):
        torch.manual_seed(123)  # the same initial UNet; train_denoiser seeds batches and noise itself
        unet = build_unet(TINY_UNET, 4, 8, 16)
        runs.append(train_denoiser(unet, noise_scheduler(), latents, captions, encode_text, TINY_UNET))
    assert runs[0] == runs[1]
    assert sum(runs[0][-5:]) < sum(runs[0][:5])


@pytest.mark.parametrize("temporal_text", [False, True])
def test_inflated_video_unet_starts_as_the_image_unet_on_every_frame(temporal_text):
    torch.manual_seed(0)
    image_unet = build_unet(TINY_UNET, 4, 8, 16)
    for parameter in image_unet.parameters():  # a "trained" image UNet: no zero-initialised layers left
        parameter.data += 0.05 * torch.randn_like(parameter)
    video_unet = inflate(image_unet, temporal_text=temporal_text)
    clip, text = torch.randn(2, 4, 3, 8, 8), torch.randn(2, 5, 16)  # (B, C, frames, h, w)
    times = torch.tensor([50, 700])
    with torch.no_grad():
        video = video_unet(clip, times, encoder_hidden_states=text).sample
        frames = clip.transpose(1, 2).flatten(0, 1)  # (B * frames, C, h, w)
        image = image_unet(frames, times.repeat_interleave(3), encoder_hidden_states=text.repeat_interleave(3, 0)).sample
    assert torch.allclose(video, image.unflatten(0, (2, 3)).transpose(1, 2), atol=1e-4)
    temporal = [name for name, _ in video_unet.named_parameters() if "temp" in name or "transformer_in" in name]
    assert temporal  # and those are what training adds


def test_temporal_layers_that_attend_to_text_get_the_prompt_at_every_position():
    torch.manual_seed(0)
    plain, reading = inflate(build_unet(TINY_UNET, 4, 8, 16)), inflate(build_unet(TINY_UNET, 4, 8, 16), temporal_text=True)
    seen = []  # (name, what each temporal cross-attention got as its keys)
    for name, module in reading.named_modules():
        if "temp_attentions" in name and name.endswith("attn2"):
            assert module.is_cross_attention and module.to_k.in_features == 16  # the prompt's width, not the frames'
            module.register_forward_hook(lambda m, args, kwargs, out, name=name: seen.append((name, kwargs["encoder_hidden_states"])),
                                         with_kwargs=True)
    assert not any("temp_attentions" in n and n.endswith("attn2") and m.is_cross_attention for n, m in plain.named_modules())
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        reading(torch.randn(2, 4, 3, 8, 8), torch.tensor([50, 700]), encoder_hidden_states=text)
    assert len(seen) == 7  # two down blocks, the mid block and two layers in each of two up blocks
    for name, keys in seen:  # (B*H*W, tokens, dim): each position's frames attend to their own clip's prompt
        positions = keys.shape[0] // 2
        assert keys.shape == (2 * positions, 5, 16) and positions in (64, 16), name
        assert torch.equal(keys[:positions], text[0].expand(positions, 5, 16)) and torch.equal(keys[positions:], text[1].expand(positions, 5, 16))
    # once trained (here: random temporal weights), the prompt changes the clip through the temporal layers too
    for name, parameter in reading.named_parameters():
        if "temp_attentions" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    clip, times = torch.randn(1, 4, 3, 8, 8), torch.tensor([300])
    with torch.no_grad():
        before = reading(clip, times, encoder_hidden_states=text[:1]).sample
        for name, module in reading.named_modules():
            if "temp_attentions" in name and name.endswith("attn2"):
                torch.nn.init.zeros_(module.to_out[0].weight)
        after = reading(clip, times, encoder_hidden_states=text[:1]).sample
    assert not torch.allclose(before, after, atol=1e-4)
