"""Parameters per training stage at full scale, beside NExT-GPT's, and what they need in GPU memory.

    python benchmarks/memory_estimate.py [--scale full] [--gpus 8]

The model is built on the `meta` device from the YAML alone (`mmlib.train.stage_sizes`: no
weights, no download). Memory is the static part a stage holds per GPU:

- frozen weights in bf16 (2 bytes each): the LLM, and in stage 3 the LoRA-free rest;
- trainable weights in fp32 (4 bytes), their gradients (4) and AdamW's two moments (8);
- under DeepSpeed ZeRO-2 the gradients and moments are split across the GPUs.

Activations come on top and grow with batch x tokens: `benchmarks/gpu_stage3.py` measures them
(one H200, batch 8 x 512 tokens with SD v1.5's UNet: 47.2 GiB peak in all). The frozen encoder and
decoders (ImageBind-Huge, SD v1.5, AudioLDM, Zeroscope) are not counted here: stage 1 needs only
the encoder, stages 2 and 3 the decoders' text encoders (and their UNets for the denoising term).
"""

import argparse

from mmlib.train import STAGES, stage_sizes

NEXTGPT = {"input projection": "4.2M", "projector image": "~32M", "projector audio": "~32M",
           "projector video": "~32M", "lora": "33.5M", "llm": "6.7B (Vicuna-7B)", "signal rows": "-"}
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="full", choices=["tiny", "small", "full"])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs for the ZeRO-2 column")
    args = parser.parse_args()
    sizes = stage_sizes(args.scale)
    print(f"{'part':<18} {'parameters':>15}  NExT-GPT")
    for name, published in NEXTGPT.items():
        print(f"{name:<18} {sizes[name]:>15,}  {published}")
    print(f"\n{'stage':<7} {'trainable':>13} {'total':>15} {'frozen bf16':>12} {'trainable+grad+Adam':>20} "
          f"{'per GPU, DDP':>13} {f'ZeRO-2 x{args.gpus}':>12}  (GiB)")
    for stage in STAGES:
        trainable, total = sizes[f"stage{stage}"]["trainable"], sizes[f"stage{stage}"]["total"]
        frozen = (total - trainable) * 2 / GIB
        state = trainable * 16 / GIB  # fp32 weight 4 + gradient 4 + AdamW moments 8
        zero2 = frozen + trainable * 4 / GIB + trainable * 12 / GIB / args.gpus
        print(f"{stage:<7} {trainable:>13,} {total:>15,} {frozen:>12.2f} {state:>20.3f} {frozen + state:>13.2f} "
              f"{zero2:>12.2f}")


if __name__ == "__main__":
    main()
