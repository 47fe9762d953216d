import numpy as np
import pytest
from transformers.audio_utils import spectrogram, window_function

from mmlib.data import ATTRIBUTES, HELDOUT_PAIRS, MODALITIES, REVEALS, World, WorldConfig, split_of, value_id
from mmlib.data.pictures import AMBIENT
from mmlib.data.sound import mel_filters
from mmlib.data.world import COLORS, uniform


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_same_seed_same_world_in_any_order_or_batch(world):
    index = world.split("test", 24)
    again = World(seed=0)
    for modality in ("image", "audio", "depth", "thermal", "imu", "video"):
        batch = world.render(modality, index)
        assert np.array_equal(batch, again.render(modality, index)), modality
        assert np.array_equal(batch[::-1], world.render(modality, index[::-1])), modality
        assert np.array_equal(batch[5:6], world.render(modality, index[5:6])), modality
    assert world.captions(index)[0] == again.captions(index)[0]


def test_another_seed_gives_another_world(world):
    index = world.split("train", 64)
    other = World(seed=1)
    assert not np.array_equal(world.scenes(index).attributes["color"], other.scenes(index).attributes["color"])
    assert not np.array_equal(world.image(index), other.image(index))


def test_uniform_is_a_pure_function_in_range():
    index = np.arange(10_000)
    u = uniform(5, index, "x", 3)
    assert u.shape == (10_000, 3) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u[123], uniform(5, [123], "x", 3)[0])
    assert not np.array_equal(u, uniform(5, index, "y", 3))


def test_shapes_dtypes_and_ranges_follow_the_config():
    config = WorldConfig(image_size=16, video_frames=4, sample_rate=16000, imu_steps=20)
    world = World(config, seed=0)
    scenes = world.scenes(world.split("val", 3))
    assert world.image(scenes).shape == (3, 3, 16, 16)
    assert world.depth(scenes).shape == (3, 1, 16, 16)
    assert world.thermal(scenes).shape == (3, 1, 16, 16)
    assert world.video(scenes).shape == (3, 4, 3, 16, 16)
    assert world.imu(scenes).shape == (3, 6, 20)
    audio = world.audio(scenes)
    assert audio.shape == (3, 16000)
    assert world.log_mel(audio).shape == (3, config.n_mels, 1 + 16000 // config.hop_length)
    for modality in ("image", "depth", "thermal", "video", "audio", "imu"):
        array = world.render(modality, scenes)
        assert array.dtype == np.float32, modality
        assert np.isfinite(array).all(), modality
    for modality in ("image", "depth", "thermal", "video"):
        array = world.render(modality, scenes)
        assert array.min() >= 0 and array.max() <= 1, modality
    assert np.abs(audio).max() <= 1


def test_world_rejects_unknown_config_keys():
    with pytest.raises(ValueError, match="valid keys: image_size"):
        World(imagesize=64)


def test_image_is_anti_aliased_and_colored_by_the_scene(world):
    scenes = world.compose(1, shape="circle", color="red", size="large", position="top left", motion="still",
                           temperature="warm")
    image = world.image(scenes)[0]  # (3, H, W)
    size = image.shape[-1]
    cx, cy = (scenes.center[0] * size).astype(int)
    assert np.allclose(image[:, cy, cx], COLORS[value_id("color", "red")], atol=1e-5)
    assert np.allclose(image[:, 0, -1], AMBIENT[value_id("temperature", "warm")], atol=1e-5)
    red = image[0]
    partial = (red > AMBIENT[1, 0] + 0.05) & (red < COLORS[0, 0] - 0.05)
    assert partial.sum() >= 8, "edges should blend object and background (anti-aliasing)"


def centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) center of mass of a (H, W) weight map, in pixels."""
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    return np.array([(xs * mask).sum(), (ys * mask).sum()]) / mask.sum()


@pytest.mark.parametrize("position", ATTRIBUTES["position"])
def test_object_sits_at_its_position(world, position):
    depth = world.depth(world.compose(1, position=position, motion="still"))[0, 0]
    x, y = centroid((depth > 0.45).astype(float)) / depth.shape[0]
    column = {"left": 0.25, "center": 0.5, "right": 0.75}[position.split()[1]]
    row = {"top": 0.3, "bottom": 0.7}[position.split()[0]]
    assert abs(x - column) < 0.08 and abs(y - row) < 0.08


@pytest.mark.parametrize("motion, axis, sign", [("left", 0, -1), ("right", 0, 1), ("up", 1, -1), ("down", 1, 1)])
def test_motion_shows_in_video_image_and_imu(world, motion, axis, sign):
    scenes = world.compose(4, motion=motion, position="bottom center", size="small", jitter=True)
    clip = world.video(scenes)  # (B, T, 3, H, W)
    still = world.image(world.edit(scenes, motion="still"))
    for b in range(len(scenes)):
        first = centroid(np.abs(clip[b, 0] - clip[b, 0, :, :1, :1]).sum(0))
        last = centroid(np.abs(clip[b, -1] - clip[b, -1, :, :1, :1]).sum(0))
        assert sign * (last - first)[axis] > 3, "the object should travel across the clip"
        trail = np.abs(world.image(scenes)[b] - still[b]).sum(0)  # only the ghost copies differ
        behind = centroid(trail) - centroid(np.abs(still[b] - still[b, :, :1, :1]).sum(0))
        assert sign * behind[axis] < -1, "the trail should lie behind the moving object"
    imu = world.imu(scenes)
    acc = imu[:, axis] * (1 if axis == 0 else -1)  # IMU y points up, image y down
    steps = imu.shape[-1]
    assert (sign * acc[:, : steps // 2].mean(1) > 0.1).all()  # speeds up along the motion
    assert (sign * acc[:, steps // 2 :].mean(1) < -0.1).all()  # then slows down


def test_temperature_shows_in_thermal_image_and_imu(world):
    levels, gyro = [], []
    for temperature in ATTRIBUTES["temperature"]:
        scenes = world.compose(8, temperature=temperature, size="large", jitter=True)
        thermal = world.thermal(scenes)[:, 0]
        size = thermal.shape[-1]
        cx, cy = (scenes.center * size).astype(int).T
        levels.append(thermal[np.arange(8), cy, cx].mean())
        gyro.append(world.imu(scenes)[:, 5].mean())
    assert levels[0] < 0.25 < levels[1] < levels[2], "cold reads below the room, hot above warm"
    assert gyro[0] < gyro[1] < gyro[2], "the gyroscope bias drifts with temperature"


def test_large_objects_are_nearer_in_depth(world):
    small = world.depth(world.compose(8, size="small", jitter=True)).max(axis=(1, 2, 3))
    large = world.depth(world.compose(8, size="large", jitter=True)).max(axis=(1, 2, 3))
    assert large.min() > small.max()


def dominant_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return np.fft.rfftfreq(len(waveform), 1 / sample_rate)[spectrum.argmax()]


def test_audio_pitch_loudness_glide_and_fade(world):
    sr = world.config.sample_rate
    notes = [dominant_frequency(world.audio(world.compose(1, shape="circle", color=c, motion="still"))[0], sr)
             for c in ATTRIBUTES["color"]]
    assert np.all(np.diff(notes) > 0), "each color is a higher note"
    assert abs(notes[0] - 196) < 3
    quiet = np.abs(world.audio(world.compose(1, size="small", motion="still"))).max()
    loud = np.abs(world.audio(world.compose(1, size="large", motion="still"))).max()
    assert 2.4 < loud / quiet < 3.2
    for motion, direction in [("up", 1), ("down", -1)]:
        wave = world.audio(world.compose(1, shape="circle", color="green", motion=motion))[0]
        start, end = dominant_frequency(wave[: sr // 4], sr), dominant_frequency(wave[-sr // 4 :], sr)
        assert direction * (end - start) > 30, motion
    for motion, direction in [("right", 1), ("left", -1)]:
        wave = world.audio(world.compose(1, motion=motion))[0]
        energy = [np.square(wave[: sr // 2]).mean(), np.square(wave[sr // 2 :]).mean()]
        assert direction * (energy[1] - energy[0]) > 0, motion


def test_timbres_differ_in_harmonics(world):
    sr = world.config.sample_rate
    rich = []
    for shape in ATTRIBUTES["shape"]:
        wave = world.audio(world.compose(1, shape=shape, color="red", motion="still"))[0]
        spectrum = np.abs(np.fft.rfft(wave))
        f0 = int(round(196 * len(wave) / sr))
        harmonics = [spectrum[k * f0 - 3 : k * f0 + 4].max() for k in range(1, 6)]
        rich.append(np.array(harmonics) / harmonics[0])
    circle, square, triangle, cross = rich
    assert circle[1:].max() < 0.01  # a pure sine
    assert square[1] < 0.02 and square[2] > 0.2  # odd harmonics only
    assert triangle[1] < 0.02 and 0.05 < triangle[2] < 0.2  # odd, falling as 1/n^2
    assert cross[1] > 0.3  # every harmonic


def test_log_mel_matches_transformers_reference(world):
    config = world.config
    waveform = world.audio(world.split("test", 2))
    mine = world.log_mel(waveform)
    for b in range(2):
        reference = spectrogram(
            waveform[b].astype(np.float64),
            window_function(config.n_fft, "hann", periodic=True),
            frame_length=config.n_fft,
            hop_length=config.hop_length,
            power=2.0,
            center=True,
            pad_mode="reflect",
            mel_filters=mel_filters(config).astype(np.float64),
            mel_floor=1e-6,
            log_mel=None,
        )
        assert np.allclose(mine[b], np.log(reference), atol=2e-3)


def test_log_mel_rejects_wrong_shape(world):
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        world.log_mel(np.zeros(8000))


def test_heldout_pairs_never_leave_the_heldout_split(world):
    held = {(value_id("shape", s), value_id("color", c)) for s, c in HELDOUT_PAIRS}
    for split in ("train", "val", "test"):
        scenes = world.scenes(world.split(split, 5000))
        pairs = set(zip(scenes.attributes["shape"].tolist(), scenes.attributes["color"].tolist()))
        assert not pairs & held, split
        assert len(pairs) == 24 - len(held)
        for name, values in ATTRIBUTES.items():
            assert set(scenes.attributes[name].tolist()) == set(range(len(values))), (split, name)
    heldout = world.scenes(world.split("heldout", 2000))
    assert set(zip(heldout.attributes["shape"].tolist(), heldout.attributes["color"].tolist())) == held


def test_attributes_are_roughly_uniform(world):
    scenes = world.scenes(world.split("train", 20_000))
    for name, values in ATTRIBUTES.items():
        counts = np.bincount(scenes.attributes[name], minlength=len(values)) / 20_000
        if name in ("shape", "color"):
            continue  # drawn as pairs, so held-out pairs make them slightly uneven
        assert np.abs(counts - 1 / len(values)).max() < 0.02, name


def test_splits_are_disjoint_ranges(world):
    assert world.split("val", 2)[0] > world.split("train")[-1]
    assert list(split_of(np.array([0, 1_000_000, 1_010_000, 1_020_000]))) == ["train", "val", "test", "heldout"]
    with pytest.raises(ValueError, match="outside every split"):
        split_of(np.array([5_000_000]))


def test_bad_requests_list_the_valid_choices(world):
    with pytest.raises(ValueError, match="unknown split 'validation'; expected one of: train, val, test, heldout"):
        world.split("validation")
    with pytest.raises(ValueError, match="holds 10000 scenes"):
        world.split("test", 20_000)
    with pytest.raises(ValueError, match="unknown modality 'smell'; expected one of: image, text, audio"):
        world.render("smell", world.split("test", 1))
    with pytest.raises(ValueError, match="unknown color value 'pink'; expected one of: red, orange"):
        world.compose(color="pink")
    with pytest.raises(ValueError, match="unknown attribute 'texture'; expected one of: shape, color"):
        world.compose(texture="rough")
    with pytest.raises(ValueError, match="color ids must be"):
        world.edit(world.compose(2), color=np.array([0, 9]))


def test_edit_changes_only_the_attribute(world):
    scenes = world.scenes(world.split("test", 16))
    blue = world.edit(scenes, color="blue")
    assert (blue.attributes["color"] == value_id("color", "blue")).all()
    for name in ATTRIBUTES:
        if name != "color":
            assert np.array_equal(blue.attributes[name], scenes.attributes[name])
    assert np.array_equal(blue.center, scenes.center)
    assert np.array_equal(world.depth(blue), world.depth(scenes))  # depth is color-blind
    assert not np.array_equal(world.image(blue), world.image(scenes))


def test_measured_reveals_match_the_datasheet(world):
    measured = world.reveals(n=16)
    for modality in MODALITIES:
        for name in ATTRIBUTES:
            expected = 1.0 if name in REVEALS[modality] else 0.0
            assert measured[modality][name] == expected, (modality, name)


def test_scenes_select_and_describe(world):
    scenes = world.scenes(world.split("test", 10))
    picked = scenes[[2, 5]]
    assert len(picked) == 2 and picked.index.tolist() == scenes.index[[2, 5]].tolist()
    assert picked.describe(0) == scenes.describe(2)
    assert scenes.names("size")[0] in ATTRIBUTES["size"]
