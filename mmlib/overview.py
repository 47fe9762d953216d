"""The course at a glance: its lessons, the loss term each one makes real, and the any-to-any map.

Introduced in `00_tour.ipynb`; the README's lesson table and the final lesson's summary follow it.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

# (notebook, title, loss term of the course notes, what the lesson builds)
LESSONS: tuple[tuple[str, str, str, str], ...] = (
    ("00_tour.ipynb", "A tour of the any-to-any map", "-",
     "the generated world in seven modalities, the zoo, the map of the model"),
    ("01_contrastive_encoders.ipynb", "Contrastive encoders: CLIP and CLAP", "L(Encoder)",
     "tokenizer, image/text/audio encoders, InfoNCE"),
    ("02_imagebind.ipynb", "ImageBind: one space for six modalities", "L(Encoder)",
     "depth, thermal, IMU, video encoders bound through images"),
    ("03_diffusion_decoders.ipynb", "Diffusion decoders and a judge", "L(Decoder)",
     "tiny Stable Diffusion, AudioLDM, Zeroscope; attribute classifiers"),
    ("04_llm_and_input_projection.ipynb", "The LLM and the input projection", "L(LLM), L(Encoder-LLM)",
     "a tiny Llama; stage 1: encoders -> LLM"),
    ("05_signal_tokens_and_output_projection.ipynb", "Signal tokens and output projection", "L(LLM-Decoder)",
     "stage 2: LLM -> decoders"),
    ("06_lora_instruction_tuning.ipynb", "LoRA instruction tuning", "L(Encoder-Decoder)",
     "stage 3: any-to-any dialogue"),
    ("07_any_to_any.ipynb", "Any-to-any, and all at once vs decompose and link", "L(Overall)",
     "the finished pipeline and the experiment"),
)


def _box(ax, x, y, w, h, text, color, fontsize=8):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02",
                                facecolor=color, edgecolor="#333333", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, style="-|>", color="#444444"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=9, color=color, linewidth=0.9))


def draw_any_to_any_map(ax=None):
    """Draw NExT-GPT's any-to-any map (encoders -> LLM -> decoders) with the loss terms and lessons."""
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 4.6))
    inputs = ["text", "image", "audio", "video", "depth", "thermal", "IMU"]
    outputs = ["image", "audio", "video"]
    for i, name in enumerate(inputs):
        y = 0.9 - i * 0.12
        _box(ax, 0.05, y, 0.075, 0.08, name, "#e8f1fb", 7)
        if name != "text":  # text tokens skip the encoders: the LLM reads them directly
            _arrow(ax, (0.09, y), (0.155, 0.54))
    _box(ax, 0.2, 0.54, 0.09, 0.5, "encoders\n(ImageBind)\n\nL(Encoder)\nlessons 1-2", "#cfe3f7")
    _box(ax, 0.34, 0.54, 0.1, 0.22, "input\nprojection\n\nL(Encoder-LLM)\nlesson 4", "#fde9c9")
    _box(ax, 0.52, 0.6, 0.13, 0.62, "LLM\n\nL(LLM)\nlesson 4\n\nLoRA:\nL(Encoder-Decoder)\nlesson 6", "#f9d5d3")
    _arrow(ax, (0.245, 0.54), (0.29, 0.54))
    _arrow(ax, (0.39, 0.54), (0.455, 0.54))
    _arrow(ax, (0.09, 0.9), (0.455, 0.86))  # text tokens go straight in
    _box(ax, 0.52, 0.12, 0.16, 0.1, "text out", "#eeeeee", 7)
    _arrow(ax, (0.52, 0.29), (0.52, 0.17))
    _box(ax, 0.68, 0.54, 0.1, 0.22, "signal tokens\n+ output\nprojection\n\nL(LLM-Decoder)\nlesson 5", "#fde9c9", 7)
    _arrow(ax, (0.585, 0.54), (0.63, 0.54))
    _box(ax, 0.83, 0.54, 0.1, 0.5, "diffusion\ndecoders\n\nL(Decoder)\nlesson 3", "#d8f0d2")
    _arrow(ax, (0.73, 0.54), (0.78, 0.54))
    for i, name in enumerate(outputs):
        y = 0.78 - i * 0.24
        _box(ax, 0.95, y, 0.075, 0.08, name, "#e8f1fb", 7)
        _arrow(ax, (0.88, 0.54), (0.912, y))
    ax.text(0.5, 0.98, "L(Overall) = L(Encoder) + L(LLM) + L(Decoder) + L(Encoder-LLM) + L(LLM-Decoder)"
            " + L(Encoder-Decoder)", ha="center", va="center", fontsize=9)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(0, 1.02)
    ax.axis("off")
    ax.set_title("The any-to-any map (NExT-GPT) and where each loss term is taught", fontsize=10)
    return ax.figure


if __name__ == "__main__":  # python -m mmlib.overview notebooks/figures/any_to_any_map.png: the README's figure
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m mmlib.overview OUTPUT.png")
    draw_any_to_any_map().savefig(sys.argv[1], dpi=110, bbox_inches="tight")
