"""One full-size stage-3 training step on one GPU: time, tokens/s, model FLOPs utilisation, memory.

    python benchmarks/gpu_stage3.py                 # full size on the GPU (CPU: add --size tiny)
    python benchmarks/gpu_stage3.py --batch 8 --seq 512 --steps 10 --checkpointing
    python benchmarks/gpu_stage3.py --batch 16 --compile    # torch.compile each LLM layer and the UNet

What one step of NExT-GPT's stage 3 does, at NExT-GPT's sizes, built from `configs/full.yaml`
alone with random weights (speed does not depend on the weights; nothing is downloaded):

- Vicuna-7B's architecture in bf16, frozen, with LoRA r=32 on q, k, v, o (the signal tokens' 36
  embedding and LM-head rows trainable too), `mmlib.instruction.add_lora`;
- the input projection (ImageBind-Huge's 1024 -> one 4096-d token), its output spliced into
  each sequence's second position;
- the image output projector (4 signal states -> SD v1.5's 77 x 768), trained;
- the losses: cross-entropy on every token, caption alignment of the projected signal states,
  and the conditional denoising loss through Stable Diffusion v1.5's UNet (frozen, bf16, 64 x 64
  latents; its architecture is diffusers' default UNet2DConditionModel with 768-d cross-attention).

Trainable weights stay fp32 and AdamW updates them; the forward pass runs under bf16 autocast.
With ``--compile``, each decoder layer of the LLM (LoRA included) and the UNet go through
`torch.compile`, which fuses the element-wise work between the matrix products (casts, norms,
LoRA's dropout and scaling, residual adds); the 32 layers share one compiled graph, so the
compilation takes tens of seconds, not minutes.
The FLOPs of one step (forward and backward) are counted by torch's FlopCounterMode, so the
utilisation is the FLOPs the step really needs over its time, against the chip's dense bf16 peak
(H100 / H200 SXM: 989 TFLOP/s; give --peak-tflops for another chip).
"""

import argparse
import time

import torch
from peft.tuners.lora import LoraLayer
from torch.utils.flop_counter import FlopCounterMode

from mmlib import config as course_config
from mmlib.diffusion import build_unet, denoising_loss, noise_scheduler
from mmlib.input_projection import InputProjection, Stage1Config
from mmlib.instruction import Stage3Config, add_lora
from mmlib.llm import LLMConfig
from mmlib.output_projection import Stage2Config, caption_alignment_loss, projector_for
from mmlib.train import ENCODER_DIM as TRAIN_ENCODER_DIM

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core FLOP/s (SXM)
ENCODER_DIM = {"full": TRAIN_ENCODER_DIM, "tiny": 64}  # ImageBind-Huge's embedding; the tiny encoders'


def build(size: str, device: torch.device, dtype: torch.dtype, checkpointing: bool):
    """The trainable stage-3 model of `size`: (LLM with LoRA, input projection, projector, UNet, conditioning)."""
    from diffusers import UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    llm_config = course_config.scale_config("llm", LLMConfig, size)
    stage1 = course_config.scale_config("stage1", Stage1Config, size)
    stage2 = course_config.scale_config("stage2", Stage2Config, size)
    stage3 = course_config.scale_config("stage3", Stage3Config, size)
    signals = sum(stage2.signal_tokens.values())
    if size == "full":
        architecture = dict(llm_config.architecture)
        conditioning = tuple(stage2.conditioning["image"])  # SD v1.5: (77, 768)
    else:  # the tiny LLM's shape over a 1,000-word vocabulary, and the tiny decoders' (32, 64)
        architecture = dict(vocab_size=1000, hidden_size=llm_config.hidden_size, num_hidden_layers=llm_config.num_layers,
                            intermediate_size=llm_config.intermediate_size, num_attention_heads=llm_config.num_heads,
                            num_key_value_heads=llm_config.num_heads, max_position_embeddings=llm_config.max_positions)
        conditioning = (32, 64)
    architecture["vocab_size"] += signals  # the signal tokens' new rows
    vocab = architecture["vocab_size"]
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # frozen weights are made in bf16 directly: 13.5 GB, not 27 in fp32 first
    with torch.device(device):
        llm = LlamaForCausalLM(LlamaConfig(**architecture, attn_implementation="sdpa"))
        if size == "full":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=conditioning[1])  # SD v1.5's shape
        else:
            from mmlib.decoders import ImageDecoderConfig
            unet = build_unet(ImageDecoderConfig().unet, 4, 8, conditioning[1])
    torch.set_default_dtype(default)
    llm.requires_grad_(False)
    unet.requires_grad_(False)
    if checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.enable_input_require_grads()
    llm = add_lora(llm, stage3.lora, list(range(vocab - signals, vocab)))
    hidden = architecture["hidden_size"]
    projection = InputProjection(ENCODER_DIM[size], hidden, stage1.projection).to(device)
    projector = projector_for(conditioning, hidden, stage2.signal_tokens["image"], stage2.projector).to(device)
    return llm, projection, projector, unet, conditioning, vocab, stage2.signal_tokens["image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["full", "tiny"], default=None, help="full on a GPU, tiny on a CPU")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (NExT-GPT's stage 3: 8 per GPU)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: 512 full, 64 tiny)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 3 warm-up steps")
    parser.add_argument("--checkpointing", action="store_true", help="recompute the LLM's activations in backward")
    parser.add_argument("--adapter-cast", action="store_true",
                        help="let peft cast activations to the fp32 adapters' dtype (its default) instead of bf16 autocast")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each LLM decoder layer and the UNet (regional compilation)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak, for the utilisation")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("full" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    llm, projection, projector, unet, conditioning, vocab, n_signal = build(size, device, dtype, args.checkpointing)
    scheduler = noise_scheduler("epsilon")  # Stable Diffusion predicts the noise
    latent_size = 64 if size == "full" else 8
    trainable = [p for m in (llm, projection, projector) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")  # one kernel per step
    B, T = args.batch, args.seq or (512 if size == "full" else 64)

    def batch(rows: int):
        ids = torch.randint(0, vocab - n_signal, (rows, T), device=device)
        ids[:, -n_signal:] = torch.arange(vocab - n_signal, vocab, device=device)  # [IMG0..3] last
        return (ids, torch.randn(rows, ENCODER_DIM[size], device=device),  # one ImageBind embedding each
                torch.randn(rows, *conditioning, device=device),  # the caption's text-encoder states
                torch.randn(rows, 4, latent_size, latent_size, device=device, dtype=dtype))  # the picture's latents

    # Trainable weights are fp32 and the forward runs in bf16 under autocast. peft would cast each
    # bf16 activation up to its fp32 adapter's dtype first (a copy per adapter, forward and
    # backward); with the cast off, autocast runs the adapter's matmuls in bf16 instead. (peft's
    # disable_input_dtype_casting does the same, but trips over the trainable signal rows.)
    for module in llm.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = args.adapter_cast

    def step(ids, encoded, target, latents) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeds = llm.get_input_embeddings()(ids)  # (B, T, H)
            soft = projection(encoded).to(embeds.dtype)  # (B, k, H): the input's soft tokens, after <bos>
            embeds = torch.cat([embeds[:, :1], soft, embeds[:, 1 + soft.shape[1]:]], dim=1)
            out = llm(inputs_embeds=embeds, labels=ids, output_hidden_states=True)
            projected = projector(out.hidden_states[-1][:, -n_signal:])  # (B, 4, H) -> (B, 77, 768)
            loss = out.loss + caption_alignment_loss(projected.float(), target)
            loss = loss + denoising_loss(unet, scheduler, latents, projected.to(dtype)).float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Model FLOPs: one sequence's forward and backward, counted without recomputation, times the batch.
    if args.checkpointing:
        llm.base_model.model.gradient_checkpointing_disable()
    with FlopCounterMode(display=False) as counter:
        step(*batch(1))
    flops = counter.get_total_flops() * B
    if args.checkpointing:
        llm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.compile:  # after the count: compiled kernels are not aten ops, FlopCounterMode would miss them
        for layer in llm.base_model.model.model.layers:
            layer.compile()
        unet.compile()
    data = batch(B)
    warm = time.perf_counter()
    for _ in range(3):
        step(*data)
    sync()
    warm = time.perf_counter() - warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(*data)
    sync()
    seconds = (time.perf_counter() - start) / args.steps

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next((v for k, v in PEAK_BF16.items() if k in name), None)
    total = sum(p.numel() for m in (llm, projection, projector, unet) for p in m.parameters())
    print(f"device: {name}; size {size}; batch {B} x {T} tokens; gradient checkpointing {args.checkpointing}; "
          f"peft's adapter input cast {args.adapter_cast}; compiled {args.compile} "
          f"(3 warm-up steps {warm:.1f} s)")
    print(f"parameters: {total / 1e6:,.1f}M in all, {sum(p.numel() for p in trainable) / 1e6:.1f}M trainable "
          f"(LoRA + signal rows {sum(p.numel() for p in llm.parameters() if p.requires_grad) / 1e6:.1f}M, "
          f"input projection {sum(p.numel() for p in projection.parameters()) / 1e6:.1f}M, "
          f"output projector {sum(p.numel() for p in projector.parameters()) / 1e6:.1f}M); "
          f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M")
    print(f"step: {seconds * 1000:.1f} ms; {B * T / seconds:,.0f} tokens/s; {flops / 1e9:,.1f} GFLOP per step "
          f"(model FLOPs: forward + backward, no recomputation); {flops / seconds / 1e12:.3f} TFLOP/s")
    if peak:
        print(f"model FLOPs utilisation: {flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s dense bf16")
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
              f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")


if __name__ == "__main__":
    main()
