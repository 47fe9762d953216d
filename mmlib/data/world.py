"""The generated world: scenes, their attributes, the splits, and one renderer per modality.

Introduced in `00_tour.ipynb`. A scene is one object with six attributes (shape, color, size,
position, motion, temperature) plus a little continuous jitter (exact position, size, angle,
color, detune). Every modality is rendered from the same scene, so all modalities are paired by
construction and anything a model generates can be graded against the scene it was asked for.

Everything is a pure function of ``(seed, scene index)``: the same seed gives the same scenes,
captions, pictures and sounds in any order, in any process, on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from mmlib import config as course_config

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross"),
    "color": ("red", "orange", "yellow", "green", "blue", "purple"),
    "size": ("small", "large"),
    "position": ("top left", "top center", "top right", "bottom left", "bottom center", "bottom right"),
    "motion": ("still", "left", "right", "up", "down"),
    "temperature": ("cold", "warm", "hot"),
}

MODALITIES = ("image", "text", "audio", "depth", "thermal", "imu", "video")

# Which attributes each modality reveals: the datasheet in data/README.md, as data.
# Text reveals whatever its caption mentions (a random subset, see `World.captions`).
REVEALS: dict[str, tuple[str, ...]] = {
    "image": ("shape", "color", "size", "position", "motion", "temperature"),
    "text": tuple(ATTRIBUTES),
    "audio": ("shape", "color", "size", "motion"),
    "depth": ("shape", "size", "position"),
    "thermal": ("shape", "size", "position", "temperature"),
    "imu": ("motion", "temperature"),
    "video": ("shape", "color", "size", "position", "motion", "temperature"),
}

# Shape-color pairs that never occur in train, val or test: the "heldout" split is made only of
# them, to measure compositional generalisation. Each shape and each color still occurs in train.
HELDOUT_PAIRS = (("circle", "yellow"), ("square", "green"), ("triangle", "purple"), ("cross", "blue"))

# Index ranges of the splits. The world is procedural, so train is effectively unlimited.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000),
    "val": (1_000_000, 1_010_000),
    "test": (1_010_000, 1_020_000),
    "heldout": (1_020_000, 1_030_000),
}

# Layout of the frame, as fractions of its width and height.
COLUMNS = (0.25, 0.5, 0.75)  # x of left, center, right
ROWS = (0.3, 0.7)  # y of top, bottom (image y grows downwards)
RADII = (0.15, 0.24)  # small, large
DIRECTIONS = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]], dtype=np.float32)  # still, l, r, u, d
TRAVEL = 0.25  # how far a moving object travels over a video clip, as a fraction of the frame
TRAIL_STEP = 0.1  # spacing of the ghost copies that show motion in a still image
COLORS = np.array(
    [
        [0.92, 0.12, 0.10],  # red
        [1.00, 0.55, 0.05],  # orange
        [0.95, 0.90, 0.10],  # yellow
        [0.10, 0.75, 0.20],  # green
        [0.15, 0.35, 1.00],  # blue
        [0.62, 0.20, 0.88],  # purple
    ],
    dtype=np.float32,
)
# Notes of the six colors (audio pitch): 5 semitones apart from G3, so glides never collide.
PITCHES = 196.0 * 2.0 ** (5 * np.arange(6) / 12)
LOUDNESS = (0.25, 0.7)  # peak amplitude of small and large objects


def check_choice(kind: str, value: str, valid: tuple[str, ...] | list[str]) -> str:
    """Return `value` if it is one of `valid`, else raise a ValueError that lists them."""
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; expected one of: {', '.join(valid)}")
    return value


def value_id(attribute: str, value: str) -> int:
    """The integer id of an attribute value, e.g. ``value_id("color", "red") == 0``."""
    check_choice("attribute", attribute, list(ATTRIBUTES))
    return ATTRIBUTES[attribute].index(check_choice(f"{attribute} value", value, ATTRIBUTES[attribute]))


# ---------------------------------------------------------------------------------------------
# Counter-based randomness: a number for (seed, index, stream, k) without any generator state,
# so a scene renders the same whether it is drawn alone, in a batch, or in a DataLoader worker.
# ---------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective hash of uint64s (Steele et al., 2014)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _stream_id(stream: str) -> np.uint64:
    """A stable integer for a stream name (Python's hash() is salted per process)."""
    value = 0
    for byte in stream.encode():
        value = (value * 131 + byte) % 2**61
    return np.uint64(value)


def uniform(seed: int, index: np.ndarray, stream: str, count: int = 1) -> np.ndarray:
    """Uniform numbers in [0, 1) of shape ``(len(index), count)``, a pure function of the inputs."""
    index = np.asarray(index, dtype=np.int64).astype(np.uint64)
    base = _splitmix64(np.array([seed], dtype=np.uint64) * _GOLDEN ^ np.array([_stream_id(stream)]))
    keys = _splitmix64(base ^ _splitmix64(index))[:, None]  # (B, 1)
    draws = _splitmix64(keys + np.arange(1, count + 1, dtype=np.uint64)[None, :] * _GOLDEN)  # (B, count)
    return (draws >> np.uint64(11)).astype(np.float64) * 2.0**-53


NOISE_TABLE_SIZE = 1 << 20


@lru_cache(maxsize=4)
def _noise_table(seed: int) -> np.ndarray:
    """A million standard normal numbers for one seed, drawn once per process."""
    return np.random.default_rng([seed, 0x5EED]).standard_normal(NOISE_TABLE_SIZE, dtype=np.float32)


def noise(seed: int, index: np.ndarray, stream: str, count: int) -> np.ndarray:
    """Standard normal noise of shape ``(len(index), count)``, a pure function of the inputs.

    Each row is a window of a per-seed table of normal numbers, starting at an offset hashed from
    (seed, index, stream): as cheap as a copy, which keeps sensor noise off the renderers' bill.
    """
    if count > NOISE_TABLE_SIZE // 4:
        raise ValueError(f"noise rows are limited to {NOISE_TABLE_SIZE // 4} numbers, asked for {count}")
    start = (uniform(seed, index, stream)[:, 0] * (NOISE_TABLE_SIZE - count)).astype(np.int64)
    return _noise_table(seed)[start[:, None] + np.arange(count)]


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """Sizes of the rendered modalities. The defaults are what the tiny course trains on."""

    image_size: int = 32  # pixels per side of image, depth, thermal and video frames
    video_frames: int = 8  # frames per video clip (Zeroscope-style decoders use 8-24)
    sample_rate: int = 8000  # Hz; 8 kHz keeps every note and its first harmonics below Nyquist
    audio_seconds: float = 1.0  # clip length
    n_fft: int = 512  # STFT window for the log-mel spectrogram (64 ms at 8 kHz)
    hop_length: int = 256  # STFT hop: 1 s at 8 kHz gives 32 frames
    n_mels: int = 32  # mel bands: with 32 frames a spectrogram is a 32x32 "image"
    imu_steps: int = 32  # samples per IMU trace


@dataclass
class Scenes:
    """A batch of B scenes: the discrete attributes and the jitter every renderer shares."""

    index: np.ndarray  # (B,) global scene indices (-1 for scenes built by `World.compose`)
    attributes: dict[str, np.ndarray]  # attribute name -> (B,) value ids into ATTRIBUTES[name]
    center: np.ndarray  # (B, 2) x, y of the object at mid-clip, fractions of the frame
    radius: np.ndarray  # (B,) object radius, fraction of the frame
    angle: np.ndarray  # (B,) rotation in radians
    rgb: np.ndarray  # (B, 3) object color in [0, 1]
    pitch: np.ndarray  # (B,) fundamental frequency in Hz at the start of the sound
    phase: np.ndarray  # (B,) start phase of the sound, in cycles
    gain: np.ndarray  # (B,) multiplier on loudness and on IMU amplitudes (around 1)
    jitter: np.ndarray  # (B, 10) the uniforms all continuous jitter above was derived from
    noise_key: np.ndarray = field(default=None)  # (B,) keys for per-sample noise; defaults to index

    def __post_init__(self) -> None:
        if self.noise_key is None:
            self.noise_key = self.index.copy()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item) -> "Scenes":
        """Select scenes with an int, slice, boolean mask or index array."""
        item = np.atleast_1d(np.arange(len(self))[item])

        def pick(array):
            return array[item]

        return Scenes(
            index=pick(self.index),
            attributes={name: pick(values) for name, values in self.attributes.items()},
            center=pick(self.center),
            radius=pick(self.radius),
            angle=pick(self.angle),
            rgb=pick(self.rgb),
            pitch=pick(self.pitch),
            phase=pick(self.phase),
            gain=pick(self.gain),
            jitter=pick(self.jitter),
            noise_key=pick(self.noise_key),
        )

    def names(self, attribute: str) -> list[str]:
        """The value names of one attribute, e.g. ``["red", "blue", ...]`` for ``"color"``."""
        check_choice("attribute", attribute, list(ATTRIBUTES))
        return [ATTRIBUTES[attribute][i] for i in self.attributes[attribute]]

    def describe(self, i: int) -> dict[str, str]:
        """The attribute values of scene `i` as names."""
        return {name: ATTRIBUTES[name][int(values[i])] for name, values in self.attributes.items()}


def split_of(index: np.ndarray) -> np.ndarray:
    """The split name of each global scene index."""
    index = np.asarray(index)
    names = np.full(index.shape, "", dtype=object)
    for name, (start, stop) in SPLITS.items():
        names[(index >= start) & (index < stop)] = name
    if (names == "").any():
        bad = index[names == ""][0]
        raise ValueError(f"scene index {bad} is outside every split; splits: {SPLITS}")
    return names


def _shape_color_pairs(heldout: bool) -> np.ndarray:
    """(n, 2) array of allowed (shape id, color id) pairs for the held-out split or the rest."""
    held = {(value_id("shape", s), value_id("color", c)) for s, c in HELDOUT_PAIRS}
    pairs = [
        (s, c)
        for s in range(len(ATTRIBUTES["shape"]))
        for c in range(len(ATTRIBUTES["color"]))
        if ((s, c) in held) == heldout
    ]
    return np.array(pairs, dtype=np.int64)


class World:
    """The generated world for one seed: draws scenes and renders them into every modality.

    >>> world = World(seed=0)
    >>> scenes = world.scenes(world.split("test", 4))
    >>> world.image(scenes).shape
    (4, 3, 32, 32)
    """

    def __init__(self, config: WorldConfig | None = None, seed: int | None = None, **overrides) -> None:
        if config is not None and overrides:
            raise ValueError("pass either a WorldConfig or keyword overrides, not both")
        self.config = config or course_config.make_config(WorldConfig, overrides)
        self.seed = course_config.seed() if seed is None else course_config.check_seed(seed, "World's seed")
        self._log_mel = None  # built on first use of log_mel
        self._captioner = None  # built on first use of captions

    def __repr__(self) -> str:
        return f"World(seed={self.seed}, config={self.config})"

    # -- splits and scenes -------------------------------------------------------------------

    def split(self, name: str, n: int | None = None, start: int = 0) -> np.ndarray:
        """Global indices of `n` scenes of split `name` (train, val, test, heldout), from `start`."""
        check_choice("split", name, list(SPLITS))
        first, stop = SPLITS[name]
        n = stop - first - start if n is None else n
        if start < 0 or n < 0 or first + start + n > stop:
            raise ValueError(f"split {name!r} holds {stop - first} scenes; asked for {n} from {start}")
        return np.arange(first + start, first + start + n, dtype=np.int64)

    def scenes(self, index) -> Scenes:
        """The scenes at the given global indices (see `split`)."""
        index = np.atleast_1d(np.asarray(index, dtype=np.int64))
        heldout = split_of(index) == "heldout"
        u = uniform(self.seed, index, "scene", 16)  # (B, 16): one column per random choice

        attributes = {}
        for column, name in enumerate(["size", "position", "motion", "temperature"]):
            attributes[name] = np.minimum((u[:, column] * len(ATTRIBUTES[name])).astype(np.int64),
                                          len(ATTRIBUTES[name]) - 1)
        shape = np.empty(len(index), dtype=np.int64)
        color = np.empty(len(index), dtype=np.int64)
        for held in (False, True):
            pairs = _shape_color_pairs(held)
            rows = heldout == held
            pick = np.minimum((u[rows, 4] * len(pairs)).astype(np.int64), len(pairs) - 1)
            shape[rows], color[rows] = pairs[pick, 0], pairs[pick, 1]
        attributes = {"shape": shape, "color": color, **attributes}
        attributes = {name: attributes[name] for name in ATTRIBUTES}  # canonical order
        return self._with_jitter(index, attributes, u[:, 5:15])

    def compose(self, n: int = 1, jitter: bool = False, key: int = 0, **values: str) -> Scenes:
        """`n` scenes with the given attribute names, e.g. ``compose(shape="circle", color="red")``.

        Attributes not given are drawn at random. With ``jitter=False`` every scene sits exactly
        on its attribute's nominal layout, pitch and color; `key` varies the random draws.
        """
        for name in values:
            check_choice("attribute", name, list(ATTRIBUTES))
        keys = -(np.arange(n, dtype=np.int64) + 1 + key * 1_000_003)  # negative: never a split index
        u = uniform(self.seed, keys, "compose", 16)
        attributes = {}
        for column, (name, choices) in enumerate(ATTRIBUTES.items()):
            if name in values:
                attributes[name] = np.full(n, value_id(name, values[name]), dtype=np.int64)
            else:
                attributes[name] = np.minimum((u[:, column] * len(choices)).astype(np.int64), len(choices) - 1)
        jitter_u = u[:, 6:16] if jitter else np.full((n, 10), 0.5)
        scenes = self._with_jitter(keys, attributes, jitter_u)
        scenes.index = np.full(n, -1, dtype=np.int64)
        return scenes

    def edit(self, scenes: Scenes, **values) -> Scenes:
        """The same scenes with some attributes changed, e.g. ``edit(scenes, color="blue")``.

        Jitter and noise stay as they were, so the renders differ only by what the change reveals.
        A value is a name (applied to every scene) or an array of value ids, one per scene.
        """
        attributes = dict(scenes.attributes)
        for name, value in values.items():
            check_choice("attribute", name, list(ATTRIBUTES))
            if isinstance(value, str):
                value = np.full(len(scenes), value_id(name, value), dtype=np.int64)
            value = np.asarray(value, dtype=np.int64)
            if value.shape != (len(scenes),) or value.min() < 0 or value.max() >= len(ATTRIBUTES[name]):
                raise ValueError(f"{name} ids must be {len(scenes)} integers in [0, {len(ATTRIBUTES[name])})")
            attributes[name] = value
        edited = self._with_jitter(scenes.noise_key, attributes, scenes.jitter)
        edited.index = scenes.index.copy()
        return edited

    def _with_jitter(self, keys: np.ndarray, attributes: dict[str, np.ndarray], u: np.ndarray) -> Scenes:
        """Attach continuous jitter (u: (B, 10) uniforms; 0.5 means none) to discrete attributes."""
        centered = u - 0.5  # (B, 10) in [-0.5, 0.5)
        position = attributes["position"]
        center = np.stack([np.asarray(COLUMNS)[position % 3], np.asarray(ROWS)[position // 3]], axis=1)
        center = center + 0.06 * centered[:, 0:2]  # +-0.03 of the frame
        radius = np.asarray(RADII)[attributes["size"]] * (1 + 0.12 * centered[:, 2])  # +-6%
        angle = np.where(attributes["shape"] == 0, 0.0, 0.42 * centered[:, 3])  # +-12 degrees
        rgb = np.clip(COLORS[attributes["color"]] + 0.1 * centered[:, 4:7], 0, 1)  # +-0.05 per channel
        pitch = PITCHES[attributes["color"]] * 2 ** (0.3 * centered[:, 7] / 12)  # +-15 cents
        phase = u[:, 8]
        gain = 1 + 0.2 * centered[:, 9]  # +-10%
        return Scenes(
            index=np.asarray(keys, dtype=np.int64),
            attributes={name: attributes[name] for name in ATTRIBUTES},
            center=center.astype(np.float32),
            radius=radius.astype(np.float32),
            angle=angle.astype(np.float32),
            rgb=rgb.astype(np.float32),
            pitch=pitch,
            phase=phase,
            gain=gain.astype(np.float32),
            jitter=np.asarray(u, dtype=np.float64),
        )

    def _as_scenes(self, scenes) -> Scenes:
        return scenes if isinstance(scenes, Scenes) else self.scenes(scenes)

    # -- renderers -----------------------------------------------------------------------------

    def image(self, scenes) -> np.ndarray:
        """RGB pictures, (B, 3, H, W) float32 in [0, 1]; a motion trail shows where it came from."""
        from mmlib.data import pictures

        return pictures.render_image(self._as_scenes(scenes), self.config.image_size)

    def depth(self, scenes) -> np.ndarray:
        """Depth maps, (B, 1, H, W) float32 in [0, 1]: nearer is brighter; large objects are near."""
        from mmlib.data import pictures

        return pictures.render_depth(self._as_scenes(scenes), self.config.image_size, self.seed)

    def thermal(self, scenes) -> np.ndarray:
        """Thermal images, (B, 1, H, W) float32 in [0, 1]: blurred, brightness is temperature."""
        from mmlib.data import pictures

        return pictures.render_thermal(self._as_scenes(scenes), self.config.image_size, self.seed)

    def video(self, scenes) -> np.ndarray:
        """Clips of the object moving, (B, T, 3, H, W) float32 in [0, 1]."""
        from mmlib.data import pictures

        return pictures.render_video(self._as_scenes(scenes), self.config.image_size, self.config.video_frames)

    def audio(self, scenes) -> np.ndarray:
        """Mono waveforms, (B, samples) float32 in [-1, 1]: timbre, pitch, loudness and glide."""
        from mmlib.data import sound

        return sound.render_audio(self._as_scenes(scenes), self.config, self.seed)

    def log_mel(self, waveform) -> np.ndarray:
        """Log-mel spectrograms of waveforms, (B, n_mels, frames) float32 (natural log)."""
        import torch

        from mmlib.data import sound

        if self._log_mel is None:
            self._log_mel = sound.LogMel(self.config)
        with torch.no_grad():
            return self._log_mel(torch.as_tensor(np.asarray(waveform, dtype=np.float32))).numpy()

    def imu(self, scenes) -> np.ndarray:
        """IMU traces, (B, 6, steps) float32: accelerometer x, y, z (in g), gyroscope x, y, z."""
        from mmlib.data import sensors

        return sensors.render_imu(self._as_scenes(scenes), self.config.imu_steps, self.seed)

    def captions(self, scenes, variant=0, mention: str | tuple[str, ...] = "random", among=tuple(ATTRIBUTES)):
        """Captions of the scenes and the attributes each one mentions.

        `variant` (int or (B,) ints) picks one of many captions per scene. `mention` is
        ``"random"`` (a random subset of attributes, shape and color most often), ``"all"``, or
        a tuple of attribute names; `among` limits "random" and "all" to some attributes (e.g.
        ``REVEALS["audio"]`` for captions of sounds). Returns ``(texts, mentioned)`` with
        `mentioned` a (B, 6) boolean array in `ATTRIBUTES` order.
        """
        from mmlib.data import captions

        if self._captioner is None:
            self._captioner = captions.Captioner()
        return self._captioner.captions(self._as_scenes(scenes), self.seed, variant, mention, among)

    def reveals(self, n: int = 32) -> dict[str, dict[str, float]]:
        """Measure which attributes each modality reveals: the datasheet, checked by experiment.

        For each attribute, `n` random scenes are rendered twice, the second time with only that
        attribute changed (same jitter, same noise). Returns, per modality and attribute, the
        fraction of pairs whose renders differ: 1.0 where the modality carries the attribute,
        0.0 where it cannot. Text uses captions that mention every attribute.
        """
        base = self.compose(n, jitter=True, key=7)
        measured = {modality: {} for modality in MODALITIES}
        for name, choices in ATTRIBUTES.items():
            shifted = self.edit(base, **{name: (base.attributes[name] + 1) % len(choices)})
            for modality in MODALITIES:
                options = {"mention": "all"} if modality == "text" else {}
                a, b = self.render(modality, base, **options), self.render(modality, shifted, **options)
                if modality == "text":
                    differ = np.array([x != y for x, y in zip(a, b)])
                else:
                    differ = np.abs(a - b).reshape(n, -1).max(axis=1) > 1e-6
                measured[modality][name] = float(differ.mean())
        return measured

    def render(self, modality: str, scenes, **options):
        """Render one modality by name; ``text`` returns only the caption strings."""
        check_choice("modality", modality, MODALITIES)
        scenes = self._as_scenes(scenes)
        if modality == "text":
            return self.captions(scenes, **options)[0]
        return getattr(self, modality)(scenes, **options)
