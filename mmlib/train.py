"""NExT-GPT's three training stages as one command, through `accelerate`, at any scale.

    python -m mmlib.train --stage 1 2 3                  # tiny scale, the course's three stages, into runs/
    python -m mmlib.train --stage 1 --config full --output runs
    accelerate launch --num_processes 8 -m mmlib.train --stage 2 3 --config full --output runs
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml -m mmlib.train --stage 3 ...

The lessons train each stage with a plain loop (`train_stage1`, `train_stage2`, `train_stage3`);
this module runs the same models and losses the way a GPU cluster wants them:

- the stage's ``batch_size`` is the **global** batch of one optimizer step: every process builds
  the same global batch (same seed, same step) and computes its loss on its own share, of
  ``batch_size / (processes * gradient_accumulation_steps)`` examples; accelerate averages the
  gradients, so 1 process or 8 take the same steps (terms that average over uneven shares, as
  stage 3's token means, are weighted by `share_weighted`); with accumulation, micro-batches weigh
  equally;
- mixed precision, gradient accumulation, DDP / DeepSpeed / FSDP are accelerate's (pick them with
  ``accelerate config`` or ``--config_file``); the ``train`` section of the YAML sets the rest;
- checkpoints are safetensors (trainable weights, optimizer moments) plus JSON (step, scheduler,
  curves); ``--resume`` continues from the newest one with the same loss curve, because every
  step's data is a function of (seed, step) alone;
- the result is saved as the zoo saves the stage (`save_stage1`, ...), so `load_stage1` and the
  notebooks read it. A stage starts from the previous stage's ``final`` in the same run folder,
  or ``--init``; at tiny scale, stage 2 or 3 run alone start from the zoo's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import trange

from mmlib import config as course_config
from mmlib import zoo
from mmlib.contrastive import History
from mmlib.data import World
from mmlib.data.world import check_choice
from mmlib.decoders import OUTPUTS

STAGES = (1, 2, 3)


@dataclass
class TrainConfig:
    """How `python -m mmlib.train` runs a stage (``configs/<scale>.yaml``, section ``train``)."""

    mixed_precision: str = ""  # "no", "fp16", "bf16" (full.yaml); "": accelerate's own (its config, --mixed_precision)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step; the global batch stays the stage's batch_size
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: none; the result is always saved)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    max_grad_norm: float = 0.0  # clip the gradients' global norm (0: no clipping)


course_config.register_section("train", TrainConfig)
PRECISIONS = ("", "no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------
# One module per stage: the model, and its loss on this process's share of step `step`'s batch
# ---------------------------------------------------------------------------------------------


class StageStep(nn.Module):
    """A stage's model and its loss: what accelerate prepares (wraps in DDP, FSDP or DeepSpeed).

    ``forward(step, start, count)`` returns the loss terms on examples ``start:start+count`` of the
    global batch of optimizer step `step`. The global batch depends on (seed, step) alone.
    """

    def __init__(self, stage: int, model: nn.Module, config, world: World) -> None:
        super().__init__()
        check_choice("stage", stage, list(STAGES))
        self.stage, self.model, self.config, self.world = stage, model, config, world
        self.schedulers = {}
        if stage == 2:  # the scenes stage 2 draws its requests from
            self.scenes = world.scenes(world.split("train", config.training_scenes))
        if stage in (2, 3) and "generation" in config.terms:
            from mmlib.diffusion import noise_scheduler

            self.schedulers = {m: noise_scheduler(model.decoders[m].config.unet.prediction_type) for m in model.outputs}

    def groups(self) -> list[dict]:
        """The optimizer's parameter groups, with the stage's learning rates."""
        if self.stage == 1:
            return [{"params": [p for p in self.model.projection.parameters() if p.requires_grad], "lr": self.config.lr,
                     "weight_decay": self.config.weight_decay}]
        if self.stage == 2:
            from mmlib.output_projection import stage2_groups

            return stage2_groups(self.model, self.config)
        from mmlib.instruction import stage3_groups

        return stage3_groups(self.model, self.config)

    @property
    def device(self) -> torch.device:
        return next(p for p in self.parameters() if p.requires_grad).device

    def generator(self, step: int) -> torch.Generator:
        """The same random draws on every process, and on a resumed run, for step `step`."""
        return torch.Generator().manual_seed(course_config.seed() * 1_000_003 + step)

    def forward(self, step: int, start: int, count: int) -> dict[str, torch.Tensor]:
        return [self._stage1, self._stage2, self._stage3][self.stage - 1](step, start, count)

    def _stage1(self, step: int, start: int, count: int) -> dict[str, torch.Tensor]:
        from mmlib.input_projection import caption_loss

        config, share = self.config, slice(start, start + count)
        return {"caption": caption_loss(self.model, self.world, config.modalities, step, config.batch_size, share)}

    def _stage2(self, step: int, start: int, count: int) -> dict[str, torch.Tensor]:
        from mmlib.decoders import training_latents
        from mmlib.output_projection import stage2_requests

        config, world, generator, scenes = self.config, self.world, self.generator(step), self.scenes
        parts = {}
        for modality in config.outputs:
            rows = torch.randint(len(scenes), (config.batch_size,), generator=generator)
            # the requests of the whole batch (half ask about what the output shows), then this share
            captions, targets = stage2_requests(world, scenes[rows.numpy()], modality, step)
            captions, targets = captions[start:start + count], targets[start:start + count]
            batch = scenes[rows[start:start + count].numpy()]
            z = None
            if "generation" in config.terms:
                k = max(1, config.generation_batch[modality] * count // config.batch_size)
                mean, std = training_latents(modality, self.model.decoders[modality].pipeline.vae, world, batch[:k])
                z = (mean + std * torch.randn(mean.shape, generator=generator)).to(self.device)
            # request(..., variant + i) phrases example i: `step + start` phrases this share as in the whole batch
            terms = self.model.losses(modality, captions, targets, z, self.schedulers.get(modality), config.terms,
                                      step + start, generator)
            parts.update({f"{modality} {term}": value for term, value in terms.items()})
        return parts

    def _stage3(self, step: int, start: int, count: int) -> dict[str, torch.Tensor]:
        from mmlib.instruction import _turn_latents, make_dialogues, replay_loss, stage3_losses, training_examples

        config, world, generator = self.config, self.world, self.generator(step)
        dialogues = make_dialogues(world, "train", config.batch_size, start=step * config.batch_size,
                                   variant=step)[start:start + count]
        prompts, inputs, answers, turns = training_examples(self.model, world, dialogues)
        latents = None
        if "generation" in config.terms:
            latents = _turn_latents(self.model, world, dialogues, config.generation_batch, generator)
            latents = {m: z.to(self.device) for m, z in latents.items()}
        counts = {}
        parts = stage3_losses(self.model, prompts, inputs, answers, turns, config.terms, latents, self.schedulers,
                              generator, counts, config.fill_unknown)
        if "replay" in config.terms:
            size = config.replay_batch  # this share's rows of the replay batch, in proportion to its dialogues
            share = slice(start * size // config.batch_size, (start + count) * size // config.batch_size)
            if share.stop > share.start:
                parts["replay"] = replay_loss(self.model, world, step, config.replay_batch, share)
                counts["replay"] = share.stop - share.start
        return share_weighted(parts, counts)

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the loss terms (stage 1 has one)."""
        if self.stage == 1:
            return parts["caption"]
        return sum(self.config.weights[name.split()[-1]] * value for name, value in parts.items())


def share_weighted(parts: dict[str, torch.Tensor], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Scale each process's mean terms so that averaging over processes gives the whole batch's means.

    A term averages over what this share holds of it (scored tokens, turns of an output): shares
    hold different amounts, and a share may hold none (no video turn). Weighting share s by
    ``processes * n_s / N`` (N summed over processes) makes the average over processes, which is
    what DDP does to gradients, equal to the mean over the global batch. One process: weight 1.
    """
    from accelerate import PartialState
    from accelerate.utils import reduce

    processes = PartialState().num_processes
    if processes == 1:
        return parts
    names = ["answer", "replay"] + [f"{m} {term}" for m in OUTPUTS for term in ("alignment", "generation")]
    local = torch.tensor([float(counts.get(name, 0)) for name in names], device=PartialState().device)
    total = reduce(local.clone(), "sum")  # (names,): every process calls this, whatever its terms
    weights = {name: processes * n / max(t, 1.0) for name, n, t in zip(names, local.tolist(), total.tolist())}
    return {name: value * weights[name] for name, value in parts.items()}


def stage_config(stage: int, scale_name: str | None = None):
    """The stage's config dataclass from the scale's YAML (default: the current scale)."""
    from mmlib.input_projection import Stage1Config
    from mmlib.instruction import Stage3Config
    from mmlib.output_projection import Stage2Config

    classes = {1: Stage1Config, 2: Stage2Config, 3: Stage3Config}
    return course_config.scale_config(f"stage{stage}", classes[stage], scale_name)


def build_stage(stage: int, config, init: str | None = None) -> nn.Module:
    """The model stage `stage` trains, from the scale's config and the previous stage's result.

    Stage 1 links the scale's encoders and LLM (`load_imagebind`, `load_llm`: the zoo's at tiny
    scale, ``pretrained:`` checkpoints at full scale). Stages 2 and 3 start from `init`, a folder
    that `save_stage1` / `save_stage2` wrote (this command's ``final``), or at tiny scale from the
    zoo's previous stage.
    """
    check_start(stage, init)
    if stage == 1:
        from mmlib.imagebind import load_imagebind
        from mmlib.input_projection import build_multimodal_llm
        from mmlib.llm import load_llm

        return build_multimodal_llm(load_imagebind(), load_llm(), config.projection)
    from mmlib.decoders import decoders_to_link

    if stage == 2:
        from mmlib.input_projection import load_stage1
        from mmlib.output_projection import build_signal_llm

        base = load_stage1(_checked(init, "stage1.json"))[0] if init else zoo.load("stage1")[0]
        return build_signal_llm(base, decoders_to_link(config.outputs, unets="generation" in config.terms), config)
    from mmlib.instruction import prepare_stage3
    from mmlib.output_projection import load_stage2

    decoders = decoders_to_link(OUTPUTS, unets="generation" in config.terms)
    folder = _checked(init, "stage2.json") if init else zoo.ensure("stage2")
    return prepare_stage3(load_stage2(folder, decoders=decoders)[0], config)


def check_start(stage: int, init: str | None) -> None:
    """Stages 2 and 3 start from the previous stage's result; only at tiny scale may the zoo stand in."""
    if stage > 1 and not init and course_config.scale() != "tiny":
        raise ValueError(f"stage {stage} at {course_config.scale()} scale starts from stage {stage - 1}'s result: "
                         f"pass --init <output of stage {stage - 1}>/final, or run --stage {stage - 1} {stage}")


def _checked(folder: str, marker: str) -> Path:
    if not (Path(folder) / marker).exists():
        raise FileNotFoundError(f"--init {folder} holds no {marker}: give the 'final' folder the previous stage wrote")
    return Path(folder)


def save_result(step: StageStep, history: History, folder: Path) -> None:
    """Write the trained stage as the zoo does, so `load_stage<N>` reads it.

    Written beside `folder`, then renamed into place: `folder` appears complete or not at all, so a
    run killed while saving leaves no ``final`` that ``--resume`` would take for finished.
    """
    for leftover in folder.parent.glob(f"{folder.name}.partial-*"):  # of a run killed while saving
        shutil.rmtree(leftover, ignore_errors=True)
    for earlier in folder.parent.glob(f"{folder.name}.replaced-*"):  # killed between the two renames below
        if folder.exists():
            shutil.rmtree(earlier, ignore_errors=True)
        else:
            os.replace(earlier, folder)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        if step.stage == 1:
            from mmlib.input_projection import save_stage1

            save_stage1(step.model, history, partial)
        elif step.stage == 2:
            from mmlib.output_projection import merge_signal_rows, save_stage2

            merge_signal_rows(step.model)
            save_stage2(step.model, history, step.config, partial)
        else:
            from mmlib.instruction import save_stage3

            save_stage3(step.model, history, step.config, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = folder.with_name(f"{folder.name}.replaced-{os.getpid()}")
    if folder.exists():  # an earlier run's result: set aside until this one is in place
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)


def finished(folder: Path, stage: int) -> bool:
    """Whether `folder` (a stage's ``final``) holds a complete result: its ``stage<N>.json``, written last."""
    return (folder / f"stage{stage}.json").is_file()


def check_output(output: Path, create: bool = True) -> Path:
    """Create the run folder `output` now, before any training, or say why it cannot be one."""
    for part in (output, *output.parents):
        if part.exists() and not part.is_dir():
            raise NotADirectoryError(f"--output {output}: {part} is a file, not a folder; give a folder path "
                                     f"(it is created if missing)")
    if not create:
        return output
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--output {output} cannot be written ({error.strerror}): give a folder you can "
                              f"write to") from None
    return output


# ---------------------------------------------------------------------------------------------
# Sizes per stage, from the config alone (the meta device: no weights, no download)
# ---------------------------------------------------------------------------------------------

ENCODER_DIM = 1024  # ImageBind-Huge's shared embedding (OpenCLIP ViT-H/14's): the input projection's input at full scale


def stage_sizes(scale_name: str = "full", encoder_dim: int | None = None) -> dict:
    """Parameter counts of the LLM side of NExT-GPT at a scale, built on the ``meta`` device.

    Returns the parts (``llm`` with the signal tokens' rows, ``input projection``, ``projector
    <output>``, ``lora``, ``signal rows``) and per stage ``{"trainable": n, "total": n}``, where
    total counts the LLM and the trainable parts (the frozen encoder and decoders load from their
    own checkpoints and are not counted). The LLM is the YAML's ``llm.architecture`` (full scale)
    or the tiny Llama's shape over the course tokenizer's vocabulary (`llama_config`).
    """
    from transformers import LlamaForCausalLM

    from mmlib.encoders import count_parameters
    from mmlib.input_projection import InputProjection
    from mmlib.instruction import add_lora
    from mmlib.llm import LLMConfig, llama_config
    from mmlib.output_projection import projector_for

    llm_config = course_config.scale_config("llm", LLMConfig, scale_name)
    if encoder_dim is None:  # ImageBind-Huge's at full scale, else the tiny encoders' shared space
        from mmlib.clip import ClipConfig
        from mmlib.imagebind import ImageBindConfig

        full = course_config.scale_config("imagebind", ImageBindConfig, scale_name).pretrained_image_text
        encoder_dim = ENCODER_DIM if full else course_config.scale_config("clip", ClipConfig, scale_name).image.embed_dim
    stage1, stage2, stage3 = (stage_config(n, scale_name) for n in STAGES)
    signals = sum(stage2.signal_tokens[m] for m in stage2.outputs)
    architecture = llama_config(None, llm_config, extra_tokens=signals)  # with the signal tokens' new rows
    hidden = architecture.hidden_size
    from mmlib.decoders import conditioning_shape

    conditioning = {m: stage2.conditioning.get(m) or conditioning_shape(m, scale_name) for m in stage2.outputs}
    missing = [m for m, shape in conditioning.items() if shape is None]
    if missing:
        raise ValueError(f"{course_config.source_name(scale_name)}:stage2.conditioning has no (tokens, dim) for {missing}, and their "
                         "decoders are not in mmlib.decoders.KNOWN_CONDITIONING: the projectors' size comes from it")
    with torch.device("meta"):
        llm = LlamaForCausalLM(architecture)
        projection = InputProjection(encoder_dim, hidden, stage1.projection)
        projectors = {m: projector_for(tuple(conditioning[m]), hidden, stage2.signal_tokens[m], stage2.projector)
                      for m in stage2.outputs}
        lora = add_lora(llm, stage3.lora) if stage3.tuning == "lora" else None

    llm_total = sum(p.numel() for n, p in llm.named_parameters() if "lora_" not in n)
    parts = {"llm": llm_total, "input projection": count_parameters(projection), "signal rows": 2 * signals * hidden,
             "lora": sum(p.numel() for n, p in llm.named_parameters() if "lora_" in n) if lora else 0}
    parts.update({f"projector {m}": count_parameters(p) for m, p in projectors.items()})
    projector_total = sum(parts[f"projector {m}"] for m in projectors)
    llm_trainable = {"lora": parts["lora"] + parts["signal rows"], "full": llm_total, "frozen": 0}[stage3.tuning]
    trainable = {1: parts["input projection"], 2: projector_total + parts["signal rows"],
                 3: llm_trainable + (parts["input projection"] + projector_total if stage3.projections else 0)}
    base = llm_total + parts["input projection"] + projector_total
    return {**parts, **{f"stage{n}": {"trainable": trainable[n], "total": base + (parts["lora"] if n == 3 else 0)}
                        for n in STAGES}}


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for the rest (nothing is unpickled on resume, except under
# DeepSpeed, whose partitioned state is its own .pt files, written by the same run)
# ---------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, model: nn.Module, optimizer, schedule, step: int, history: History) -> None:
    """Trainable weights, optimizer moments, scheduler and curves after `step` optimizer steps."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    save_file(weights, folder / "trainable.safetensors")
    state = optimizer.state_dict()
    moments = {f"{index}.{key}": value.contiguous().cpu() for index, values in state["state"].items()
               for key, value in values.items() if isinstance(value, torch.Tensor)}
    save_file(moments, folder / "optimizer.safetensors")
    groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
    record = {"step": step, "param_groups": groups, "scheduler": schedule.state_dict(), "history": asdict(history)}
    (folder / "trainer.json").write_text(json.dumps(record))


def load_checkpoint(folder: Path, model: nn.Module, optimizer, schedule) -> tuple[int, History]:
    """Restore what `save_checkpoint` wrote into `model`, `optimizer` and `schedule`: (step, history)."""
    record = json.loads((folder / "trainer.json").read_text())
    weights = load_file(folder / "trainable.safetensors")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(trainable):
        missing, extra = sorted(set(trainable) - set(weights)), sorted(set(weights) - set(trainable))
        raise ValueError(f"{folder} does not fit this model's trainable weights: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}; was it written by another stage or config?")
    for name, value in weights.items():
        if value.shape != trainable[name].shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(value.shape)}, this model's {tuple(trainable[name].shape)}; "
                             "was it written with another config?")
    with torch.no_grad():
        for name, value in weights.items():
            trainable[name].copy_(value)
    moments = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, value in moments.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
    schedule.load_state_dict(record["scheduler"])
    return record["step"], History(**record["history"])


def latest_checkpoint(output: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` folder under `output`, if any."""
    found = sorted((p for p in output.glob("checkpoint-*") if (p / "trainer.json").exists()),  # written last
                   key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def run(stage: int, output: str | Path, steps: int | None = None, init: str | None = None, resume: bool = False,
        train: TrainConfig | None = None) -> History:
    """Train `stage` with accelerate and write ``<output>/final`` (and checkpoints); returns the curves.

    `steps` overrides the stage config's (a few steps to try a set-up). ``history.loss["total"]``
    is the loss of each optimizer step, averaged over processes and micro-batches.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    train = train or course_config.scale_config("train", TrainConfig)
    check_choice("mixed precision", train.mixed_precision, list(PRECISIONS))
    check_start(stage, init)  # before accelerate claims the devices
    output = check_output(Path(output))
    # Stage 3's projectors get no gradient on a share without a turn for their output: DDP must look for those.
    accelerator = Accelerator(cpu=course_config.device().type == "cpu", mixed_precision=train.mixed_precision or None,
                              gradient_accumulation_steps=train.gradient_accumulation_steps,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=stage == 3)])
    config = stage_config(stage)
    if steps is not None:
        config = course_config.make_config(type(config), {**asdict(config), "steps": steps})
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        raise ValueError("FSDP shards the weights themselves, and mmlib.train saves each stage from whole weights: "
                         "use DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml: it shards the optimizer "
                         "state and gradients, which is where a LoRA run's memory goes) or plain DDP")
    shares = accelerator.num_processes * train.gradient_accumulation_steps
    if config.batch_size % shares:
        raise ValueError(f"stage{stage}.batch_size {config.batch_size} must divide into {accelerator.num_processes} "
                         f"processes x {train.gradient_accumulation_steps} accumulation steps ({shares} shares)")
    count = config.batch_size // shares
    course_config.seed_everything()
    step_module = StageStep(stage, build_stage(stage, config, init), config, World())
    _move_decoders(step_module.model, accelerator.device)
    optimizer = torch.optim.AdamW(step_module.groups(), weight_decay=0.0)
    schedule = course_config.one_cycle(optimizer, config.steps, 0.05)
    # The scheduler is stepped here once per optimizer step, not prepared: accelerate's wrapper
    # would step it once per process.
    if accelerator.state.deepspeed_plugin is not None:
        # No dataloader tells DeepSpeed the batch; a run of several stages reuses one config, so both are set anew.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=count, train_batch_size=config.batch_size)
        deepspeed_precision(ds_config, accelerator.device)
    model, optimizer = accelerator.prepare(step_module, optimizer)
    first, history = 0, History()
    checkpoint = latest_checkpoint(output) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint-<step> folder under {output}")
    if checkpoint is not None and kind == "DEEPSPEED":  # its optimizer state is partitioned: its own format
        accelerator.load_state(str(checkpoint / "deepspeed"))
        record = json.loads((checkpoint / "trainer.json").read_text())
        first, history = record["step"], History(**record["history"])
        schedule.load_state_dict(record["scheduler"])
    elif checkpoint is not None:
        first, history = load_checkpoint(checkpoint, accelerator.unwrap_model(model), optimizer, schedule)
    model.eval()  # frozen parts keep inference behaviour
    if stage == 3 and config.tuning == "lora" and config.lora.dropout > 0:
        step_module.model.base.llm.train()
    start_time = time.perf_counter()
    bar = trange(first, config.steps, desc=f"stage {stage}", initial=first, total=config.steps,
                 disable=not (accelerator.is_local_main_process and course_config.show_progress()))
    for step in bar:
        logged: dict[str, float] = {}
        for micro in range(train.gradient_accumulation_steps):
            start = (micro * accelerator.num_processes + accelerator.process_index) * count
            with accelerator.accumulate(model):
                parts = model(step, start, count)
                loss = step_module.total(parts)
                accelerator.backward(loss)
                if accelerator.sync_gradients and train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # Each share's terms are weighted so that their mean over shares is the batch's
            # (`share_weighted`); a share may lack a term (no video turn), so they are gathered as objects.
            local = {name: value.item() for name, value in parts.items()} | {"total": loss.item()}
            for share in gather_object([local]):
                for name, value in share.items():
                    logged[name] = logged.get(name, 0.0) + value / shares
        schedule.step()
        for name, value in logged.items():
            history.loss.setdefault(name, []).append(value)
        bar.set_postfix(loss=f"{logged['total']:.3f}")
        done = step + 1
        if train.checkpoint_every and done % train.checkpoint_every == 0 and done < config.steps:
            _checkpoint(accelerator, output, model, optimizer, schedule, done, history, train.keep_checkpoints)
    history.seconds += time.perf_counter() - start_time
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_result(accelerator.unwrap_model(model), history, output / "final")
    accelerator.wait_for_everyone()
    return history


def deepspeed_precision(ds_config: dict, device: torch.device) -> dict:
    """bf16 under DeepSpeed as under DDP: autocast in the forward, weights left in their own dtypes.

    DeepSpeed's ``bf16`` mode casts the whole prepared module to bf16 and turns off any autocast
    around it: the encoders would then meet fp32 inputs with bf16 weights, and the decoders (kept
    outside the module) bf16 conditioning with fp32 weights. So ``bf16`` becomes DeepSpeed's
    ``torch_autocast`` section (tested with DeepSpeed 0.19.8): the forward runs under `torch.autocast`, ZeRO-2
    shards fp32 gradients and AdamW state, frozen weights keep the dtype they were loaded in
    (bf16 at full scale), and gradients are reduced in fp32 (no lower-precision modules). fp16,
    with DeepSpeed's loss scaling, is left as configured. Returns `ds_config`, changed in place.
    """
    bf16 = ds_config.get("bf16") or {}
    if bf16.get("enabled") in (True, "true") and device.type != "cpu":
        ds_config["bf16"] = {**bf16, "enabled": False}
        ds_config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds_config


def _checkpoint(accelerator, output: Path, model, optimizer, schedule, step: int, history: History, keep: int) -> None:
    accelerator.wait_for_everyone()
    folder = output / f"checkpoint-{step}"
    if accelerator.distributed_type.value == "DEEPSPEED":  # every process writes its partition
        accelerator.save_state(str(folder / "deepspeed"))
        if accelerator.is_main_process:
            record = {"step": step, "scheduler": schedule.state_dict(), "history": asdict(history)}
            (folder / "trainer.json").write_text(json.dumps(record))
    elif accelerator.is_main_process:
        save_checkpoint(folder, accelerator.unwrap_model(model), optimizer, schedule, step, history)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-max(keep, 1)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _move_decoders(model: nn.Module, device: torch.device) -> None:
    """The decoders are not submodules (their weights stay out of the stage's state): move them too."""
    for module in model.decoder_modules() if hasattr(model, "decoder_modules") else []:
        module.to(device)


def run_stages(stages, output: str | Path = "runs", steps: int | None = None, init: str | None = None,
               resume: bool = False, train: TrainConfig | None = None) -> dict[int, History]:
    """Run stages in order, each in ``<output>/stage<N>``; a later stage starts from the earlier's ``final``.

    With `resume`, a stage whose ``final`` exists is skipped and an unfinished one continues from
    its newest checkpoint. `init` is where the first stage starts from (stages 2 and 3).
    """
    stages = sorted(set(stages))
    if stages != list(range(stages[0], stages[-1] + 1)):
        raise ValueError(f"stages {stages} skip one: each starts from the one before (e.g. --stage 1 2 3)")
    output, histories = Path(output), {}
    check_output(output, create=False)
    if resume and not any((output / f"stage{n}").is_dir() for n in stages):  # a run makes its stage folder first
        raise FileNotFoundError(f"--resume: {output} holds no stage{stages[0]}..stage{stages[-1]} folder of a run to "
                                f"resume; check --output, or leave out --resume to start afresh")
    check_output(output)
    for stage in stages:
        folder = output / f"stage{stage}"
        start_from = init if stage == stages[0] else str(output / f"stage{stage - 1}" / "final")
        if resume and finished(folder / "final", stage):
            continue
        histories[stage] = run(stage, folder, steps, start_from, resume and latest_checkpoint(folder) is not None, train)
    return histories


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmlib.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, nargs="+", required=True, choices=STAGES,
                        help="1, 2 or 3, or several in a row (--stage 1 2 3)")
    parser.add_argument("--config", help="a scale (tiny, small, full) or a YAML file shaped like configs/<scale>.yaml, "
                        "layered over the scale MMLIB_SCALE names (default: MMLIB_SCALE alone)")
    parser.add_argument("--output", default="runs", help="run folder: stage N writes <output>/stage<N>/checkpoint-*, "
                        "and its result to <output>/stage<N>/final (default: runs)")
    parser.add_argument("--init", help="where the first stage given starts from, if 2 or 3: the previous stage's final "
                        "folder (default at tiny scale: the zoo's)")
    parser.add_argument("--steps", type=int, help="override each stage's number of optimizer steps")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, continue the unfinished one "
                        "from its newest checkpoint")
    args = parser.parse_args(argv)
    if args.config:
        use_config(args.config)
    for stage, history in run_stages(args.stage, args.output, args.steps, args.init, args.resume).items():
        total = history.loss.get("total", [])
        if total and int(os.environ.get("RANK", "0")) == 0:
            print(f"stage {stage}: {len(total)} steps, last loss {total[-1]:.4f}, {history.seconds:.0f} s "
                  f"-> {Path(args.output) / f'stage{stage}' / 'final'}")


def use_config(name: str) -> None:
    """Point the course's settings at a scale name or a YAML file (``MMLIB_SCALE`` / ``MMLIB_CONFIG_FILE``)."""
    if name in course_config.SCALES:
        os.environ["MMLIB_SCALE"] = name
        return
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"--config {name}: neither a scale ({', '.join(course_config.SCALES)}) nor a YAML file")
    if path.stem in course_config.SCALES and path.resolve().parent == course_config.CONFIG_DIR:
        os.environ["MMLIB_SCALE"] = path.stem
        return
    os.environ["MMLIB_CONFIG_FILE"] = str(path.resolve())
    course_config.check_config_file(course_config.scale())


if __name__ == "__main__":
    main()
