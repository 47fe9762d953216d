"""Speed of lesson 4's LLM and stage 1 on this machine, and the full-size model's parameter counts.

    python benchmarks/llm_speed.py

Builds the tiny LLM and encoders from their configs with untrained weights (speed does not depend
on the weights; nothing is trained or downloaded) and prints seconds per text-pretraining step,
per stage-1 step (frozen LLM, gradients through it to the projection), caption throughput
(greedy, 24 new tokens at most), the process's peak memory, and Vicuna-7B + NExT-GPT's input
projection counted on the `meta` device with their weights' size in bf16.
"""

import resource

import torch
from transformers import LlamaForCausalLM

from mmlib import config as course_config
from mmlib.data import World
from mmlib.encoders import ConvEncoderConfig, build_encoders, count_parameters, tower_spec
from mmlib.imagebind import ImageBindConfig, TOWER_KINDS
from mmlib.input_projection import INPUTS, InputProjection, Stage1Config, build_multimodal_llm, caption_batch
from mmlib.llm import LLMConfig, TrainedLLM, build_llm, lm_batch, llama_config, text_corpus
from mmlib.tokenizer import train_tokenizer
from timing import seconds  # benchmarks/timing.py, next to this script


def main() -> None:
    world = World(seed=0)
    tokenizer = train_tokenizer(world)
    tokenizer.model_max_length = 128
    llm_config = course_config.scale_config("llm", LLMConfig, "tiny")
    model = build_llm(tokenizer, llm_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    texts = text_corpus(world, world.split("train", llm_config.batch_size))

    def llm_step():
        loss = model(**lm_batch(tokenizer, texts)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    print(f"threads {torch.get_num_threads()}")
    print(f"LLM pretraining: {seconds(llm_step, 20):.3f} s/step (batch {llm_config.batch_size}, "
          f"{count_parameters(model):,} parameters)")

    binding = ImageBindConfig()
    specs = {"image": tower_spec("conv", ConvEncoderConfig())}  # lesson 1's image tower
    specs.update({m: tower_spec(TOWER_KINDS[m], getattr(binding, m)) for m in INPUTS if m != "image"})
    encoders = build_encoders(specs).eval()
    stage1 = course_config.scale_config("stage1", Stage1Config, "tiny")
    linked = build_multimodal_llm(encoders, TrainedLLM(model.eval(), tokenizer), stage1.projection)
    projection_optimizer = torch.optim.AdamW(linked.projection.parameters(), lr=1e-4)
    scenes = world.scenes(world.split("train", stage1.batch_size))

    def stage1_step():
        prompts, inputs, answers, _ = caption_batch(linked, world, INPUTS, scenes, 0)
        loss = linked.answer_loss(linked.prepare(prompts, inputs, answers)).mean()
        projection_optimizer.zero_grad()
        loss.backward()
        projection_optimizer.step()

    print(f"stage 1: {seconds(stage1_step, 20):.3f} s/step (batch {stage1.batch_size}, renders and encodes included)")
    pictures = torch.from_numpy(world.image(world.scenes(world.split("test", 100))))
    per_batch = seconds(lambda: linked.caption("image", pictures), 3)
    print(f"captioning: {100 / per_batch:.0f} captions/s (batches of 100, greedy)")
    print(f"peak memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    full = course_config.scale_config("llm", LLMConfig, "full")
    with torch.device("meta"):
        vicuna = LlamaForCausalLM(llama_config(None, full))
        projection = InputProjection(1024, vicuna.config.hidden_size,
                                     course_config.scale_config("stage1", Stage1Config, "full").projection)
    total = count_parameters(vicuna)
    print(f"full scale (meta device): Vicuna-7B {total / 1e9:.2f}B parameters ({2 * total / 2**30:.1f} GiB in bf16); "
          f"input projection 1024 -> {vicuna.config.hidden_size}: {count_parameters(projection):,} parameters "
          "(NExT-GPT: ~4.2M)")


if __name__ == "__main__":
    main()
