from dataclasses import dataclass

import pytest
import torch

from mmlib import config


def test_defaults(monkeypatch):
    monkeypatch.delenv("MMLIB_SCALE", raising=False)
    monkeypatch.delenv("MMLIB_SEED", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert config.scale() == "tiny"
    assert config.seed() == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a Colab GPU: the small configs
    assert config.scale() == "small"
    monkeypatch.setenv("MMLIB_SCALE", "tiny")
    assert config.scale() == "tiny"


def test_scale_and_seed_from_environment(monkeypatch):
    monkeypatch.setenv("MMLIB_SCALE", "full")
    monkeypatch.setenv("MMLIB_SEED", "42")
    assert config.scale() == "full"
    assert config.seed() == 42
    assert "scale=full seed=42" in config.describe()


def test_unknown_scale_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("MMLIB_SCALE", "huge")
    with pytest.raises(ValueError, match="valid scales: tiny, small, full"):
        config.scale()


@pytest.mark.parametrize("text", ["abc", "-1", "1.5", str(2**64), str(2**32)])
def test_bad_seed(monkeypatch, text):
    monkeypatch.setenv("MMLIB_SEED", text)
    with pytest.raises(ValueError, match="MMLIB_SEED must be a non-negative integer"):
        config.seed()


def test_device_override(monkeypatch):
    monkeypatch.setenv("MMLIB_DEVICE", "cpu")
    assert config.device() == torch.device("cpu")
    monkeypatch.setenv("MMLIB_DEVICE", "not-a-device")
    with pytest.raises(ValueError, match="MMLIB_DEVICE"):
        config.device()


def test_a_device_this_machine_lacks_is_refused_at_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for name in ("cuda", "cuda:1", "mps"):
        monkeypatch.setenv("MMLIB_DEVICE", name)
        with pytest.raises(ValueError, match=rf"MMLIB_DEVICE={name} but this torch .* sees no \w+ device: unset MMLIB_DEVICE"):
            config.device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("MMLIB_DEVICE", "cuda:1")
    with pytest.raises(ValueError, match=r"there are 1 CUDA devices \(cuda:0 to cuda:0\)"):
        config.device()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_a_worlds_seed_out_of_range_is_refused_when_made(seed):
    from mmlib.data import World

    with pytest.raises(ValueError, match=r"World's seed must be a non-negative integer up to 4294967295"):
        World(seed=seed)


def test_seed_everything_makes_torch_repeatable():
    config.seed_everything(3)
    first = torch.rand(4)
    config.seed_everything(3)
    assert torch.equal(first, torch.rand(4))


@dataclass
class Example:
    width: int = 8  # a documented default
    depth: int = 2


def test_make_config_accepts_known_keys():
    assert config.make_config(Example, width=4) == Example(width=4, depth=2)
    assert config.make_config(Example, {"depth": 5}) == Example(depth=5)


def test_make_config_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'widht' for Example; valid keys: width, depth"):
        config.make_config(Example, widht=4)


@dataclass
class Outer:
    inner: Example = None
    name: str = "x"


def test_make_config_builds_nested_dataclasses_and_names_the_bad_key_path():
    built = config.make_config(Outer, {"inner": {"width": 3}})
    assert built.inner == Example(width=3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'inner.widht' for Example; valid keys: width, depth"):
        config.make_config(Outer, {"inner": {"widht": 3}})


def test_nested_overrides_keep_the_fields_own_defaults():
    """A section that names one key of a nested config keeps the rest of that field's default."""
    from mmlib.decoders import VideoDecoderConfig

    video = config.make_config(VideoDecoderConfig, {"unet": {"steps": 5}})
    default = VideoDecoderConfig()
    assert video.unet.steps == 5
    assert (video.unet.batch_size, video.unet.lr, video.unet.training_scenes) == \
        (default.unet.batch_size, default.unet.lr, default.unet.training_scenes) == (16, 3e-3, 4096)
    with pytest.raises(ValueError, match="unet.stpes"):
        config.make_config(VideoDecoderConfig, {"unet": {"stpes": 5}})


def test_on_training_device_changes_nothing_on_a_cpu(monkeypatch):
    monkeypatch.setenv("MMLIB_DEVICE", "cpu")
    layer = torch.nn.Linear(2, 2)
    weight = layer.weight
    with config.on_training_device(layer) as device:
        assert device == torch.device("cpu") and layer.weight is weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checked on the device machine)")
def test_lesson_loops_train_on_the_gpu_and_hand_back_cpu_modules(monkeypatch):
    from mmlib.data import World
    from mmlib.judge import JudgeConfig, train_classifier

    monkeypatch.delenv("MMLIB_DEVICE", raising=False)
    layer = torch.nn.Linear(2, 2)
    with config.on_training_device(layer) as device:
        assert device.type == "cuda" and layer.weight.device.type == "cuda"
        with config.on_cpu(layer):  # an evaluation or a sample in the middle of training
            assert layer.weight.device.type == "cpu"
        assert layer.weight.device.type == "cuda"
    assert layer.weight.device.type == "cpu"
    model = train_classifier("image", JudgeConfig(), World(seed=0), steps=3)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_one_cycle_is_torchs_schedule_rising_to_each_groups_rate():
    def rates(make, steps):
        layer = torch.nn.Linear(2, 2)
        optimizer = torch.optim.AdamW([{"params": [layer.weight], "lr": 1e-2}, {"params": [layer.bias], "lr": 1e-3}])
        schedule, seen = make(optimizer, steps), []
        for _ in range(steps):
            seen.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            schedule.step()
        return seen

    ours = rates(lambda o, n: config.one_cycle(o, n, 0.05), 100)
    torchs = rates(lambda o, n: torch.optim.lr_scheduler.OneCycleLR(o, [1e-2, 1e-3], total_steps=n, pct_start=0.05), 100)
    assert ours == torchs
    assert max(r[0] for r in ours) == pytest.approx(1e-2) and max(r[1] for r in ours) == pytest.approx(1e-3)


@pytest.mark.parametrize("steps, warmup", [(20, 0.05), (10, 0.1), (1, 0.05)])
def test_one_cycle_takes_a_warm_up_of_one_step_or_less(steps, warmup):
    # torch's OneCycleLR divides by zero when the warm-up is exactly one step (20 steps at 0.05)
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    schedule, seen = config.one_cycle(optimizer, steps, warmup), []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(0 < lr <= 0.1 + 1e-12 for lr in seen) and seen == sorted(seen, reverse=True)


@pytest.mark.parametrize("steps, warmup, message", [(0, 0.05, "positive whole number of steps"),
                                                    (2.5, 0.05, "positive whole number of steps"),
                                                    (10, 1.5, "fraction of the steps")])
def test_one_cycle_rejects_bad_steps_and_warm_up(steps, warmup, message):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        config.one_cycle(optimizer, steps, warmup)


def test_a_lesson_loop_trains_with_a_one_step_warm_up():
    from mmlib.data import World
    from mmlib.judge import JudgeConfig, train_classifier

    model = train_classifier("image", JudgeConfig(), World(seed=0), steps=10)  # warm-up 0.1 of 10 steps: one
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_gives_the_same_weights_whatever_the_thread_count():
    """Every loop trains on one thread (config.one_thread): a machine with more cores trains the same model.

    Three steps of the judge's convolutional classifier: with two threads its convolutions sum in
    another order, and the weights differ by about 2e-4 without the pin.
    """
    from mmlib.data import World
    from mmlib.judge import JudgeConfig, train_classifier

    world, weights, before = World(seed=0), [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            config.seed_everything(0)
            model = train_classifier("image", JudgeConfig(), world, steps=3)
            weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
            assert torch.get_num_threads() == threads, "the thread count is restored after training"
    finally:
        torch.set_num_threads(before)
    assert torch.equal(weights[0], weights[1])


def test_one_thread_restores_the_count_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with config.one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("training failed")
    assert torch.get_num_threads() == before


# -- a user's own config file (MMLIB_CONFIG_FILE) ---------------------------------------------------

def mine(tmp_path, monkeypatch, text: str):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    monkeypatch.setenv("MMLIB_CONFIG_FILE", str(path))
    monkeypatch.setenv("MMLIB_SCALE", "tiny")
    return path


def test_a_one_line_file_changes_one_key_and_keeps_the_scales_tuned_values(tmp_path, monkeypatch):
    from mmlib.llm import LLMConfig

    tuned = config.scale_config("llm", LLMConfig, "tiny")
    assert tuned.steps != LLMConfig().steps, "tiny.yaml tunes llm.steps (else this test checks nothing)"
    mine(tmp_path, monkeypatch, "llm: {lr: 0.002}\n")
    llm = config.scale_config("llm", LLMConfig)
    assert llm.lr == 0.002 and llm.steps == tuned.steps and llm.num_heads == tuned.num_heads


def test_an_unknown_section_in_a_users_file_is_named_with_the_file(tmp_path, monkeypatch):
    from mmlib.llm import LLMConfig

    path = mine(tmp_path, monkeypatch, "llm: {lr: 0.002}\nlmm: {steps: 5}\n")
    with pytest.raises(ValueError, match=rf"{path}: unknown section 'lmm'; known sections: .*llm"):
        config.scale_config("llm", LLMConfig)


def test_a_mistyped_key_names_the_users_file_not_the_scales(tmp_path, monkeypatch):
    from mmlib.llm import LLMConfig

    mine(tmp_path, monkeypatch, "llm: {stpes: 5}\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'mine.yaml:llm.stpes' for LLMConfig; valid keys: .*steps"):
        config.scale_config("llm", LLMConfig)


@pytest.mark.parametrize("text, message", [
    ("llm: {batch_size: 12.5}\n", r"mine.yaml:llm.batch_size is 12.5 \(float\), but it must be a whole number"),
    ("llm: {steps: '100'}\n", r"mine.yaml:llm.steps is '100' \(str\), but it must be a whole number"),
    ("llm: {lr: fast}\n", r"mine.yaml:llm.lr is 'fast' \(str\), but it must be a number"),
    ("stage3: {lora: {r: true}}\n", r"mine.yaml:stage3.lora.r is True \(bool\), but it must be a whole number"),
    ("stage3: {lora: 8}\n", r"mine.yaml:stage3.lora is 8 \(int\), but it must be a LoraSettings section"),
    ("stage3: {terms: answer}\n", r"mine.yaml:stage3.terms is 'answer' \(str\), but it must be a list"),
    ("llm: 1800\n", r"mine.yaml: section 'llm' must be a mapping of keys"),
])
def test_a_value_of_the_wrong_type_is_refused_with_its_path(tmp_path, monkeypatch, text, message):
    from mmlib.llm import LLMConfig

    mine(tmp_path, monkeypatch, text)
    with pytest.raises(ValueError, match=message):
        config.scale_config("llm", LLMConfig)


def test_yamls_1e_3_string_is_read_as_the_number_it_spells(tmp_path, monkeypatch):
    from mmlib.llm import LLMConfig

    mine(tmp_path, monkeypatch, "llm: {lr: 1e-3}\n")  # YAML 1.1 reads this as the string '1e-3'
    assert config.scale_config("llm", LLMConfig).lr == 0.001


def test_invalid_yaml_names_the_file_and_line(tmp_path, monkeypatch):
    from mmlib.llm import LLMConfig

    path = mine(tmp_path, monkeypatch, "llm:\n  steps: 5\n  lr: [0.1\n")
    with pytest.raises(ValueError, match=rf"{path}, line \d+ is not valid YAML"):
        config.scale_config("llm", LLMConfig)
