"""Pictures, plots and players for the generated world's modalities, used by every lesson.

Introduced in `00_tour.ipynb`. Functions take arrays as the renderers return them (or tensors),
draw on a given matplotlib axis when one is passed, and return the figure or the player.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np

from mmlib.data.world import ATTRIBUTES, MODALITIES, REVEALS

IMU_CHANNELS = ("acc x", "acc y", "acc z", "gyro x", "gyro y", "gyro z")


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def show_image(image, ax=None, title: str | None = None, cmap: str | None = None):
    """Draw one picture: (3, H, W) RGB or (1, H, W) / (H, W) single channel, values in [0, 1]."""
    picture = _numpy(image)
    if picture.ndim == 3 and picture.shape[0] == 3:
        picture = picture.transpose(1, 2, 0)  # (H, W, 3) for imshow
    elif picture.ndim == 3:
        picture = picture[0]
    ax = ax or plt.gca()
    ax.imshow(np.clip(picture, 0, 1), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_grid(images, titles=None, columns: int = 8, cmap: str | None = None, size: float = 1.1):
    """A figure with a grid of pictures (N, C, H, W) and optional titles."""
    images = _numpy(images)
    if titles is not None:  # wrap long titles (captions) to the width of a panel
        titles = [textwrap.fill(str(title), width=max(8, int(size * 13))) for title in titles]
    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * size * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(images):
            show_image(images[i], ax, titles[i] if titles is not None else None, cmap)
        else:
            ax.axis("off")
    fig.tight_layout()
    return fig


def show_video(clip, ax_row=None, title: str | None = None):
    """A strip of a clip's frames (T, 3, H, W) side by side; returns the figure."""
    frames = _numpy(clip)
    if ax_row is None:
        _, ax_row = plt.subplots(1, len(frames), figsize=(len(frames) * 1.0, 1.5))
    for t, ax in enumerate(ax_row):
        show_image(frames[t], ax, f"t={t}")
    if title:
        ax_row[0].set_ylabel(title, fontsize=8, rotation=0, ha="right", va="center")
    return ax_row[0].figure


def show_mel(mel, ax=None, title: str | None = None):
    """Draw a log-mel spectrogram (n_mels, frames), low frequencies at the bottom."""
    ax = ax or plt.gca()
    ax.imshow(_numpy(mel), origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("frame", fontsize=8)
    ax.set_ylabel("mel band", fontsize=8)
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_imu(trace, ax=None, title: str | None = None):
    """Plot the six IMU channels (6, T) over time."""
    trace = _numpy(trace)
    ax = ax or plt.gca()
    for channel, name in enumerate(IMU_CHANNELS):
        ax.plot(trace[channel], label=name, linestyle="-" if channel < 3 else "--", linewidth=1)
    ax.set_xlabel("sample", fontsize=8)
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def audio_player(waveform, sample_rate: int):
    """An IPython audio player for one waveform (samples,), not rescaled so loudness is heard."""
    from IPython.display import Audio

    return Audio(_numpy(waveform), rate=sample_rate, normalize=False)


def reveals_table_markdown() -> str:
    """The datasheet's modality x attribute table (`REVEALS`) as Markdown."""
    lines = ["| modality | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for modality in MODALITIES:
        marks = ["yes" if name in REVEALS[modality] else "-" for name in ATTRIBUTES]
        lines.append(f"| {modality} | " + " | ".join(marks) + " |")
    return "\n".join(lines)
