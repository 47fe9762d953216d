"""Cost of lesson 6's stage 3 on this machine: frozen LLM vs LoRA vs full fine-tuning, and at full size.

    python benchmarks/stage3_speed.py

Builds the tiny LLM, an image encoder and the three decoders from their configs with untrained
weights (speed does not depend on the weights; nothing is downloaded; see stage2_speed.py), then
for each way of tuning the LLM runs 10 stage-3 steps on picture dialogues in a forked process
and prints seconds per step, trainable parameters, the training state (weights, gradients and
AdamW's two moments, in fp32) and the peak resident memory while it trains (Linux). Last, the same counts for
Vicuna-7B with NExT-GPT's LoRA, built on the `meta` device, in bf16 weights + fp32 training state.
"""

import copy
import multiprocessing
from dataclasses import replace

import torch

from mmlib import config as course_config
from mmlib.data import World
from mmlib.encoders import ConvEncoderConfig, build_encoders, tower_spec
from mmlib.input_projection import Stage1Config, build_multimodal_llm
from mmlib.instruction import (LoraSettings, Stage3Config, add_lora, peak_resident_gib, prepare_stage3, reset_peak,
                               train_stage3, trainable_parameters)
from mmlib.llm import LLMConfig, TrainedLLM, build_llm, llama_config
from mmlib.output_projection import Stage2Config, build_signal_llm, merge_signal_rows
from mmlib.tokenizer import train_tokenizer
from stage2_speed import untrained_decoders  # benchmarks/stage2_speed.py, next to this script
from timing import seconds

PICTURE_TEMPLATES = ["describe-picture", "recolor-picture", "sound-of-picture", "move-clip", "see-then-draw"]
STEPS = 10


def state_mib(total: int, trainable: int) -> float:
    """fp32 weights of everything, plus a gradient and AdamW's two moments per trainable parameter."""
    return (4 * total + 12 * trainable) / 2**20


def run(tuning: str, model, world, queue) -> None:
    reset_peak()
    config = replace(course_config.scale_config("stage3", Stage3Config, "tiny"), tuning=tuning, steps=STEPS)
    tuned = prepare_stage3(copy.deepcopy(model), config)
    step = seconds(lambda: train_stage3(tuned, config, world, PICTURE_TEMPLATES), 1) / STEPS
    queue.put((tuning, step, trainable_parameters(tuned), peak_resident_gib()))


def main() -> None:
    world = World(seed=0)
    tokenizer = train_tokenizer(world)
    llm_tokenizer = copy.deepcopy(tokenizer)
    llm_tokenizer.model_max_length = 128
    llm = TrainedLLM(build_llm(llm_tokenizer, course_config.scale_config("llm", LLMConfig, "tiny")), llm_tokenizer)
    encoders = build_encoders({"image": tower_spec("conv", ConvEncoderConfig())}).eval()
    base = build_multimodal_llm(encoders, llm, course_config.scale_config("stage1", Stage1Config, "tiny").projection)
    model = build_signal_llm(base, untrained_decoders(world, tokenizer), course_config.scale_config("stage2", Stage2Config, "tiny"))
    merge_signal_rows(model)
    print(f"threads {torch.get_num_threads()}; {STEPS} steps of {Stage3Config().batch_size} dialogues each, in a fresh process per row")
    context = multiprocessing.get_context("fork")  # each row's peak memory is its own process's
    for tuning in ("frozen", "lora", "full"):
        queue = context.Queue()
        process = context.Process(target=run, args=(tuning, model, world, queue))
        process.start()
        name, step, counts, peak = queue.get()
        process.join()
        llm_share = counts["llm trainable"] / counts["llm total"]
        trainable = counts["llm trainable"] + counts["projections trainable"]
        total = counts["llm total"] + counts["projections trainable"]
        print(f"{name:6s}: {step:.3f} s/step; LLM trainable {counts['llm trainable']:,} ({llm_share:.1%}), "
              f"projections {counts['projections trainable']:,}; training state {state_mib(total, trainable):.1f} MiB; "
              + (f"peak memory {peak:.2f} GiB" if peak is not None else "peak memory: not measured here"))

    full_llm = course_config.scale_config("llm", LLMConfig, "full")
    lora = course_config.scale_config("stage3", Stage3Config, "full").lora
    with torch.device("meta"):
        vicuna = add_lora(build_full(full_llm), lora)
    adapters = sum(p.numel() for p in vicuna.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in vicuna.parameters() if not p.requires_grad)
    projections = 4.2e6 + 3 * 32e6  # lesson 4's input projection and lesson 5's three output projectors
    for name, llm_trainable in (("LoRA r=32", adapters), ("full fine-tuning", weights)):
        trainable = llm_trainable + projections
        gib = (2 * weights + 16 * trainable) / 2**30  # bf16 weights; fp32 master copy, gradient, 2 moments
        print(f"Vicuna-7B, {name}: LLM trainable {llm_trainable / 1e6:,.1f}M ({llm_trainable / weights:.2%} of "
              f"{weights / 1e9:.2f}B) + projections {projections / 1e6:.0f}M; weights + training state about "
              f"{gib:.0f} GiB before activations")


def build_full(config: LLMConfig):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(None, config))


if __name__ == "__main__":
    main()
