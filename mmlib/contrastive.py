"""Contrastive learning: CLIP's symmetric InfoNCE loss, its learnable temperature, a training loop.

Introduced in `01_contrastive_encoders.ipynb`; reused by `02_imagebind.ipynb`. Given a batch of
B matching pairs (an image and its caption, a sound and its caption), the loss asks each item to
pick its own partner out of the B candidates on the other side, in both directions:

    logits = s * A @ B^T          (B, B): s = exp(log_scale) = 1 / temperature, clamped at 100
    L = (CE(logits, diag) + CE(logits^T, diag)) / 2
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from mmlib import config as course_config

MAX_LOGIT_SCALE = 100.0  # CLIP's cap: a temperature below 0.01 makes training unstable


class LogitScale(nn.Module):
    """CLIP's temperature, stored as a log: ``scale = exp(log_scale)``, at most 100."""

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)), requires_grad=learnable)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    @property
    def temperature(self) -> float:
        return 1.0 / float(self().detach())


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs; a[i] and b[i] are unit vectors (B, D).

    Written out by hand: cross-entropy of the true pair is ``logsumexp(row) - logit of the pair``.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"contrastive_loss needs two (batch, dim) tensors of one shape; got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    logits = logit_scale * a @ b.T  # (B, B): row i scores a[i] against every b
    matching = logits.diagonal()  # (B,): the true pairs
    a_to_b = (torch.logsumexp(logits, dim=1) - matching).mean()  # each a picks its b
    b_to_a = (torch.logsumexp(logits, dim=0) - matching).mean()  # each b picks its a
    return (a_to_b + b_to_a) / 2


@dataclass
class ContrastiveConfig:
    """How long and how fast a contrastive run trains."""

    steps: int = 700  # optimizer steps; every step sees freshly rendered scenes
    batch_size: int = 128  # pairs per step; each item has batch_size - 1 negatives
    lr: float = 3e-3  # peak learning rate (one-cycle: warm up, then cosine down)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # share of steps spent warming up
    learn_temperature: bool = True  # False keeps the temperature at init_temperature
    init_temperature: float = 0.07  # CLIP's initial temperature


@dataclass
class History:
    """What a training run logged: per step and per named loss, and at evaluation points."""

    loss: dict[str, list[float]] = field(default_factory=dict)  # e.g. {"image-text": [...]}
    temperature: dict[str, list[float]] = field(default_factory=dict)
    evaluations: list[dict] = field(default_factory=list)  # {"step": s, metric: value, ...}
    seconds: float = 0.0
    peak_memory_gib: float | None = None  # the process's peak resident memory while training, where measured

    @property
    def steps(self) -> int:
        return max((len(values) for values in self.loss.values()), default=0)


def train_contrastive(
    losses: Callable[[int], dict[str, torch.Tensor]],
    parameter_groups: list[dict],
    config: ContrastiveConfig,
    logit_scales: dict[str, LogitScale],
    modules: list[nn.Module] = (),
    evaluate: Callable[[], dict] | None = None,
    eval_every: int = 0,
    description: str = "contrastive",
) -> History:
    """Minimise the sum of the named contrastive losses `losses(step)` for `config.steps` steps.

    Each name has its own `LogitScale` in `logit_scales` (trained too unless it was built with
    ``learnable=False``). `parameter_groups` are the optimizer's groups (each may set its own
    ``lr``, shaped by a one-cycle schedule); `modules` are put in train mode, and in eval mode
    around `evaluate`, which runs every `eval_every` steps and at the end.
    """
    groups = [dict(group) for group in parameter_groups]
    scales = [scale.log_scale for scale in logit_scales.values() if scale.log_scale.requires_grad]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0})
    for group in groups:
        group.setdefault("lr", config.lr)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    schedule = course_config.one_cycle(optimizer, config.steps, config.warmup_fraction)
    history, start = History(), time.perf_counter()

    def run_evaluation(step: int) -> None:
        for module in modules:
            module.eval()
        # evaluations run on CPU tensors, as everywhere in the course, wherever the caller trains
        with course_config.on_cpu(*modules), torch.no_grad():
            history.evaluations.append({"step": step, **evaluate()})
        for module in modules:
            module.train()

    for module in modules:
        module.train()
    for step in course_config.training_steps(config.steps, description):
        parts = losses(step)
        optimizer.zero_grad(set_to_none=True)
        sum(parts.values()).backward()
        optimizer.step()
        schedule.step()
        for name, value in parts.items():
            history.loss.setdefault(name, []).append(value.item())
            history.temperature.setdefault(name, []).append(logit_scales[name].temperature)
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < config.steps:
            run_evaluation(step + 1)
    if evaluate is not None:
        run_evaluation(config.steps)
    for module in modules:
        module.eval()
    history.seconds = time.perf_counter() - start
    return history


def plot_history(history: History, title: str = "", axes=None):
    """Loss and temperature over the steps of a contrastive run, one line per named loss."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(8, 2.6))
    for name in history.loss:
        axes[0].plot(history.loss[name], linewidth=0.8, label=name)
        axes[1].plot(history.temperature[name], label=name)
    axes[0].set(xlabel="step", ylabel="InfoNCE loss", title=f"{title} loss".strip())
    axes[1].set(xlabel="step", ylabel="temperature", title=f"{title} temperature".strip())
    if len(history.loss) > 1:
        axes[0].legend(fontsize=7, ncol=2)
    axes[0].figure.tight_layout()
    return axes[0].figure
