"""Speed of lesson 3's decoders on this machine: training steps, sampling and the vocoder.

    python benchmarks/decoder_speed.py

Builds the tiny decoders from their configs with untrained weights (speed does not depend on the
weights, and nothing has to be trained or downloaded first) and prints seconds per training step
at the configured batch size, outputs per second when sampling (DDIM, 25 steps, classifier-free
guidance), Griffin-Lim throughput and the process's peak memory.
"""

import resource

import torch

from mmlib import config as course_config
from mmlib.autoencoder import AudioAutoencoderConfig, AutoencoderConfig, build_autoencoder
from mmlib.data import World
from mmlib.decoders import CONFIGS, assemble, griffin_lim
from mmlib.diffusion import build_unet, denoising_loss, inflate, noise_scheduler, prompt_states
from mmlib.encoders import TextEncoder, TextEncoderConfig
from mmlib.tokenizer import train_tokenizer
from timing import seconds  # benchmarks/timing.py, next to this script


def main() -> None:
    world = World(seed=0)
    text = TextEncoder(TextEncoderConfig(), train_tokenizer(world))
    vaes = {"image": build_autoencoder(AutoencoderConfig()), "audio": build_autoencoder(AudioAutoencoderConfig())}
    image_unet = build_unet(CONFIGS["image"]().unet, 4, 8, text.config.hidden_size)
    unets = {"image": image_unet, "audio": build_unet(CONFIGS["audio"]().unet, 4, 8, text.config.hidden_size),
             "video": inflate(image_unet, temporal_text=CONFIGS["video"]().temporal_text)}
    scheduler = noise_scheduler()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for modality, unet in unets.items():
        config = CONFIGS[modality]()
        batch = config.unet.batch_size
        shape = (batch, 4, world.config.video_frames, 8, 8) if modality == "video" else (batch, 4, 8, 8)
        latents = torch.randn(shape)
        states = prompt_states(text.transformer, text.tokenizer, ["a large red circle in the top left"] * batch)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def step():
            loss = denoising_loss(unet, scheduler, latents, states)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        train = seconds(step, 5)
        decoder = assemble(modality, vaes["audio" if modality == "audio" else "image"], text.transformer,
                           text.tokenizer, unet.eval(), scheduler, config)
        prompts = world.captions(world.scenes(world.split("test", 50)), mention="all")[0]
        sample = seconds(lambda: decoder(prompts, vocode=False), 1)
        print(f"{modality:<5} train {train:.3f} s/step (batch {batch}, {config.unet.steps} steps = "
              f"{train * config.unet.steps / 60:.1f} min); sampling {len(prompts) / sample:.1f} outputs/s")
    mels = torch.from_numpy(world.log_mel(world.audio(world.scenes(world.split("test", 100)))))
    vocoder = seconds(lambda: griffin_lim(mels), 1)
    print(f"Griffin-Lim vocoder: {len(mels) / vocoder:.0f} clips/s")
    print(f"peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    course_config.seed_everything(0)
    main()
