"""Speed of lesson 5's stage 2 on this machine, and the full-size output projectors' sizes.

    python benchmarks/stage2_speed.py

Builds the tiny LLM, encoders and decoders from their configs with untrained weights (speed does
not depend on the weights; the decoders' UNets take one training step so that real pipelines
exist; nothing is downloaded) and prints seconds per stage-2 step for the zoo's terms (NLL +
alignment, all three outputs) with the MLP and the transformer projector, and with the denoising
term added, the seconds to answer 16 image
requests (LLM generation; then signal states, projector and decoder), the process's peak memory, and NExT-GPT's
full-size projectors counted on the `meta` device with their weights' size in fp32.
"""

import copy
import resource
from dataclasses import replace

import torch

from mmlib import config as course_config
from mmlib.autoencoder import AutoencoderConfig, build_autoencoder
from mmlib.clip import ClipConfig
from mmlib.data import World
from mmlib.decoders import CONFIGS, OUTPUTS, train_decoder
from mmlib.encoders import ConvEncoderConfig, TextEncoder, build_encoders, count_parameters, tower_spec
from mmlib.input_projection import Stage1Config, build_multimodal_llm
from mmlib.llm import LLMConfig, TrainedLLM, build_llm
from mmlib.output_projection import Stage2Config, build_signal_llm, projector_for, request, train_stage2
from mmlib.tokenizer import train_tokenizer
from timing import seconds  # benchmarks/timing.py, next to this script


def untrained_decoders(world, tokenizer):
    text = TextEncoder(course_config.scale_config("clip", ClipConfig, "tiny").text, tokenizer)  # lesson 1's text tower
    decoders = {}
    for modality in ("image", "audio"):
        section = f"{modality}_vae"
        vae_config = course_config.scale_config(section, AutoencoderConfig, "tiny")
        vae = build_autoencoder(replace(vae_config, channels=3 if modality == "image" else 1))
        config = course_config.scale_config(f"{modality}_decoder", CONFIGS[modality], "tiny")
        config = replace(config, unet=replace(config.unet, steps=1, training_scenes=8), snapshots=[])
        decoders[modality] = train_decoder(modality, config, world, vae=vae, text=text)
    config = course_config.scale_config("video_decoder", CONFIGS["video"], "tiny")
    config = replace(config, unet=replace(config.unet, steps=1, training_scenes=8), snapshots=[])
    decoders["video"] = train_decoder("video", config, world, image_decoder=decoders["image"])
    return decoders


def main() -> None:
    world = World(seed=0)
    tokenizer = train_tokenizer(world)
    encoders = build_encoders({"image": tower_spec("conv", ConvEncoderConfig())}).eval()
    llm_tokenizer = copy.deepcopy(tokenizer)  # the decoders' text encoders keep 32 positions, the LLM reads 128
    llm_tokenizer.model_max_length = 128
    llm = TrainedLLM(build_llm(llm_tokenizer, course_config.scale_config("llm", LLMConfig, "tiny")), llm_tokenizer)
    base = build_multimodal_llm(encoders, llm, course_config.scale_config("stage1", Stage1Config, "tiny").projection)
    decoders = untrained_decoders(world, tokenizer)
    config = course_config.scale_config("stage2", Stage2Config, "tiny")
    print(f"threads {torch.get_num_threads()}")
    transformer = replace(config.projector, kind="transformer")
    for terms, projector in [(tuple(config.terms), config.projector), (tuple(config.terms), transformer),
                             (("nll", "alignment", "generation"), config.projector)]:
        run = replace(config, terms=terms, steps=10, training_scenes=32, projector=projector)
        trained = build_signal_llm(copy.deepcopy(base), decoders, run)
        step = seconds(lambda: train_stage2(trained, run, world), 1) / run.steps  # (and encoding 32 scenes' latents once)
        print(f"stage 2, {' + '.join(terms)}, {projector.kind} projector: {step:.3f} s/step ({len(OUTPUTS)} outputs, "
              f"{config.batch_size} requests each; {config.steps} steps: {step * config.steps / 60:.1f} min)")
    captions = world.captions(world.scenes(world.split("test", 16)), mention="all")[0]
    prompts = [request("image", caption, i) for i, caption in enumerate(captions)]
    model = build_signal_llm(base, decoders, config)  # untrained: it may not ask, so time the two halves apart
    write = seconds(lambda: model.write(prompts), 2)
    draw = seconds(lambda: model.decoders["image"](prompt_embeds=model.project("image", prompts)), 2)
    print(f"16 image requests: the LLM answers in {write:.2f} s (24 new tokens at most); signal states, "
          f"projector and decoder take {draw:.2f} s")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    full = course_config.scale_config("stage2", Stage2Config, "full")
    with torch.device("meta"):
        for modality in OUTPUTS:
            projector = projector_for(tuple(full.conditioning[modality]), 4096, full.signal_tokens[modality], full.projector)
            n = count_parameters(projector)
            print(f"full-size {modality} projector: {full.signal_tokens[modality]} signal tokens of Vicuna-7B (4096) -> "
                  f"{tuple(full.conditioning[modality])}: {n / 1e6:.1f}M parameters, {4 * n / 2**20:.0f} MiB in fp32")


if __name__ == "__main__":
    main()
