"""Audio of the generated world: waveforms from scenes, and their log-mel spectrograms.

Introduced in `00_tour.ipynb`. The mapping is meant to be heard and learned:

- shape -> timbre: circle a pure sine, square odd harmonics (1/n), triangle odd harmonics
  (1/n^2, a softer hollow sound), cross all harmonics (1/n, a bright sawtooth);
- color -> pitch: six notes five semitones apart, from G3 (196 Hz) to G#5 (831 Hz);
- size -> loudness: large objects are about 9 dB louder;
- motion -> change over time: up glides 4 semitones up, down 4 down, right fades in, left
  fades out, still holds steady.

Oscillators read band-limited wavetables (every harmonic kept below 0.45 x the sample rate), so
the sound does not alias. The log-mel spectrogram uses transformers' mel filter bank.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.audio_utils import mel_filter_bank

from mmlib.data.world import LOUDNESS, PITCHES, WorldConfig, Scenes, noise

TABLE_SIZE = 2048
GLIDE_SEMITONES = 4.0
FADE_FLOOR = 0.15  # a fading sound starts (right) or ends (left) at this fraction of its peak
NOISE_FLOOR = 0.003  # a little hiss, so silence has a finite log-mel


def _harmonic_weights(shape_id: int, count: int) -> np.ndarray:
    """Amplitudes of harmonics 1..count for one timbre (before band-limiting)."""
    n = np.arange(1, count + 1, dtype=np.float64)
    odd = (n % 2) == 1
    if shape_id == 0:  # circle: sine
        return (n == 1).astype(np.float64)
    if shape_id == 1:  # square: odd harmonics 1/n
        return odd / n
    if shape_id == 2:  # triangle: odd harmonics 1/n^2, alternating sign
        return odd * (-1.0) ** ((n - 1) // 2) / n**2
    return 1.0 / n  # cross: sawtooth


def wavetables(sample_rate: int) -> np.ndarray:
    """(shapes, colors, TABLE_SIZE) single cycles, band-limited for each color's highest pitch."""
    phase = np.arange(TABLE_SIZE) / TABLE_SIZE
    tables = np.zeros((4, len(PITCHES), TABLE_SIZE), dtype=np.float32)
    for color, pitch in enumerate(PITCHES):
        highest = pitch * 2 ** ((GLIDE_SEMITONES + 0.5) / 12)  # top of an upward glide, detuned
        count = max(1, int(0.45 * sample_rate / highest))
        harmonics = np.sin(2 * np.pi * np.outer(np.arange(1, count + 1), phase))  # (count, TABLE_SIZE)
        for shape in range(4):
            cycle = _harmonic_weights(shape, count) @ harmonics
            tables[shape, color] = cycle / np.abs(cycle).max()  # same peak for every timbre
    return tables


_TABLES: dict[int, np.ndarray] = {}


def render_audio(scenes: Scenes, config: WorldConfig, seed: int) -> np.ndarray:
    """Waveforms (B, samples) float32 in [-1, 1] for a batch of scenes."""
    sr = config.sample_rate
    samples = int(round(sr * config.audio_seconds))
    if sr not in _TABLES:
        _TABLES[sr] = wavetables(sr)
    motion = scenes.attributes["motion"]
    t = np.arange(samples, dtype=np.float32)[None, :] / samples  # (1, N) clip time in [0, 1)

    # Pitch: a glide of GLIDE_SEMITONES over the clip for up (+) and down (-).
    glide = np.select([motion == 3, motion == 4], [1.0, -1.0], 0.0).astype(np.float32)[:, None]
    frequency = scenes.pitch.astype(np.float32)[:, None] * np.exp2(glide * (GLIDE_SEMITONES / 12) * t)  # (B, N)
    cycles = scenes.phase[:, None] + np.cumsum(frequency, axis=1, dtype=np.float64) / sr  # (B, N) in cycles
    position = (np.mod(cycles, 1.0) * TABLE_SIZE).astype(np.float32)  # where in the wavetable
    frac, whole = np.modf(position)
    left = whole.astype(np.int32) % TABLE_SIZE  # float32 rounding can land exactly on TABLE_SIZE
    rows = _TABLES[sr][scenes.attributes["shape"], scenes.attributes["color"]]  # (B, TABLE_SIZE)
    below = np.take_along_axis(rows, left, axis=1)
    above = np.take_along_axis(rows, (left + 1) % TABLE_SIZE, axis=1)
    wave = below + frac * (above - below)  # linear interpolation between table entries

    # Loudness: envelope = start + slope * t, fading in (right) or out (left).
    start = np.select([motion == 2], [FADE_FLOOR], 1.0).astype(np.float32)[:, None]
    slope = np.select([motion == 2, motion == 1], [1 - FADE_FLOOR, FADE_FLOOR - 1], 0.0).astype(np.float32)[:, None]
    peak = (np.asarray(LOUDNESS, dtype=np.float32)[scenes.attributes["size"]] * scenes.gain)[:, None]
    ramp = np.minimum(1.0, np.minimum(t, 1.0 - t) / 0.01)  # 10 ms attack and release: no clicks
    waveform = (peak * ramp) * (start + slope * t) * wave
    waveform += NOISE_FLOOR * noise(seed, scenes.noise_key, "audio", samples)  # a little hiss
    return np.clip(waveform, -1, 1, out=waveform)


def mel_filters(config: WorldConfig) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) Slaney mel filter bank from transformers' audio utilities."""
    return mel_filter_bank(
        num_frequency_bins=config.n_fft // 2 + 1,
        num_mel_filters=config.n_mels,
        min_frequency=60.0,
        max_frequency=config.sample_rate / 2,
        sampling_rate=config.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    ).astype(np.float32)


class LogMel(torch.nn.Module):
    """Waveforms (B, samples) -> natural-log mel power spectrograms (B, n_mels, frames).

    A module, so an audio encoder can carry its own front end to any device; `World.log_mel`
    uses the same one.
    """

    def __init__(self, config: WorldConfig) -> None:
        super().__init__()
        self.n_fft, self.hop_length = config.n_fft, config.hop_length
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filters(config)), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.ndim != 2:
            raise ValueError(f"log-mel expects waveforms of shape (batch, samples), got {tuple(waveform.shape)}")
        spectrum = torch.stft(waveform.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                              return_complex=True)
        power = spectrum.abs() ** 2  # (B, n_fft // 2 + 1, frames)
        mel = torch.einsum("bft,fm->bmt", power, self.filters)  # (B, n_mels, frames)
        return torch.log(mel.clamp_min(1e-6))
