"""Device, scale and seed for the whole course, and checked construction of config dataclasses.

Introduced in `00_tour.ipynb`. Every notebook and every zoo entry reads these three settings
from here, so one environment variable changes them everywhere:

- ``MMLIB_SCALE``: ``tiny`` (default without a GPU; laptop CPU and CI), ``small`` (default with a
  CUDA GPU, e.g. Colab's T4) or ``full`` (real checkpoints on real GPUs);
- ``MMLIB_SEED``: an integer, default 0; every random thing in the course flows from it;
- ``MMLIB_DEVICE``: optional override of the device (``cpu``, ``cuda``, ``cuda:1``, ``mps``);
- ``MMLIB_PROGRESS``: ``0`` hides progress bars (default: shown);
- ``MMLIB_CONFIG_FILE``: optional YAML file of your own, layered over ``configs/<scale>.yaml``:
  the keys it names replace the scale's, the others keep the scale's tuned values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import os
import random
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

SCALES = ("tiny", "small", "full")
DEFAULT_SCALE = "tiny"
DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # NumPy's largest seed; every generator of the course takes it

T = TypeVar("T")


def scale() -> str:
    """The course scale from ``MMLIB_SCALE``, checked against `SCALES`.

    Unset, it is ``small`` where a CUDA GPU is present (a Colab T4 trains the small configs) and
    ``tiny`` elsewhere; set ``MMLIB_SCALE=tiny`` to run the CI's scale on a GPU.
    """
    default = "small" if torch.cuda.is_available() and not os.environ.get("MMLIB_DEVICE", "").startswith("cpu") \
        else DEFAULT_SCALE
    return check_scale(os.environ.get("MMLIB_SCALE", default))


def check_scale(name: str) -> str:
    """Return `name` if it is a known scale, else raise a ValueError listing the valid ones."""
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid scales: {', '.join(SCALES)} (set MMLIB_SCALE)")
    return name


def seed() -> int:
    """The course seed from ``MMLIB_SEED`` (default 0)."""
    text = os.environ.get("MMLIB_SEED", str(DEFAULT_SEED))
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"MMLIB_SEED must be a non-negative integer, got {text!r}") from None
    return check_seed(value, "MMLIB_SEED")


def check_seed(value, name: str = "seed") -> int:
    """`value` if it is a whole number in [0, MAX_SEED], else a ValueError naming `name` and the range."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be a non-negative integer up to {MAX_SEED} (2**32 - 1), got {value!r}")
    return int(value)


def device() -> torch.device:
    """The device to compute on: ``MMLIB_DEVICE`` if set, else cuda, then mps, then cpu."""
    override = os.environ.get("MMLIB_DEVICE")
    if override:
        try:
            chosen = torch.device(override)
        except RuntimeError as error:
            raise ValueError(f"MMLIB_DEVICE={override!r} is not a torch device: {error}") from None
        present = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(chosen.type, lambda: True)
        if not present():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"MMLIB_DEVICE={override} but this torch ({torch.__version__}, {build}) sees no "
                             f"{chosen.type} device: unset MMLIB_DEVICE or set it to cpu")
        if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise ValueError(f"MMLIB_DEVICE={override} but there are {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextlib.contextmanager
def on_training_device(*modules: torch.nn.Module):
    """Train `modules` on `device()`, then hand them back on the CPU; yields the device.

    The lessons' loops (contrastive encoders, judge, VAE, denoiser, LLM pretraining, stages 1-3)
    train inside it: with a GPU their steps run there, while evaluation, sampling and saving keep
    working on CPU tensors as everywhere else in the course. On a CPU it changes nothing.
    """
    target = device()
    for module in modules:
        module.to(target)
    try:
        yield target
    finally:
        if target.type != "cpu":
            for module in modules:
                module.to("cpu")


@contextlib.contextmanager
def on_cpu(*modules: torch.nn.Module):
    """Run a block with `modules` on the CPU (an evaluation or a sample in the middle of training), then put each back."""
    devices = [next((p.device for p in module.parameters()), torch.device("cpu")) for module in modules]
    for module in modules:
        module.to("cpu")
    try:
        yield
    finally:
        for module, where in zip(modules, devices):
            module.to(where)


def seed_everything(value: int | None = None) -> int:
    """Seed Python, NumPy and torch with `value` (default: the course seed) and return it."""
    value = seed() if value is None else value
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    return value


def one_cycle(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.OneCycleLR:
    """Every training loop's schedule: the first `warmup` of `steps` rise to each group's ``lr``, the rest
    anneal (torch's ``OneCycleLR``). Step it once per optimizer step."""
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"a training run needs a positive whole number of steps, got {steps!r}: set the config's steps")
    if not 0 <= warmup < 1:
        raise ValueError(f"the warm-up is a fraction of the steps in [0, 1), got {warmup!r}")
    if abs(warmup * steps - 1) < 1e-9:  # torch divides by (warm-up steps - 1): one step of warm-up is none
        warmup = (1 - 1e-6) / steps
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                               total_steps=steps, pct_start=warmup)


def from_pretrained_safely(load, name_or_path, **kwargs):
    """``load(name_or_path, use_safetensors=True, **kwargs)`` (a ``from_pretrained``), or, for a checkpoint
    published only as pickles, an error that says how to convert it once."""
    try:
        return load(name_or_path, use_safetensors=True, **kwargs)
    except OSError as error:
        if "safetensors" not in str(error):
            raise
        raise OSError(f"{name_or_path} holds no safetensors weights, and mmlib reads no others: a .bin or .pt file is "
                      f"a pickle, which can run code when it is loaded. Convert it once where you trust it: load it "
                      f"with use_safetensors=False, save_pretrained(<folder>) (which writes safetensors), and name "
                      f"<folder> as pretrained: in your config. ({str(error).splitlines()[0]})") from None


def show_progress() -> bool:
    """Whether training loops draw progress bars (``MMLIB_PROGRESS=0`` turns them off).

    `make course` turns them off: a bar saved in a committed notebook would show frozen at 0%.
    """
    return os.environ.get("MMLIB_PROGRESS", "1") not in ("0", "false", "no")


@contextlib.contextmanager
def one_thread():
    """Run a block on one CPU thread, then restore the thread count.

    Floats summed by two threads are summed in another order than by one, so a model trained
    with another thread count is another model. The course trains on one thread everywhere: a
    learner's laptop, whatever its cores, trains the weights CI measured. (The zoo trains
    several entries at once instead, one core each.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_steps(steps: int, description: str, first: int = 0):
    """The step numbers of a training loop, ``range(first, steps)``, run on one thread (`one_thread`).

    Every loop of the course counts its steps through here. They are drawn as a progress bar with
    the time left; ``MMLIB_PROGRESS=0`` hides it, and `mmlib.zoo` gives each entry it trains at
    once a line of its own (``MMLIB_PROGRESS_LINE``).
    """
    from tqdm.auto import trange

    line = os.environ.get("MMLIB_PROGRESS_LINE")
    with one_thread():
        yield from trange(first, steps, desc=description, initial=first, total=steps, leave=False,
                          disable=not show_progress(), position=int(line) if line else None)


def describe() -> str:
    """One line naming the device, scale and seed in use, printed by every notebook's setup cell."""
    return f"device={device()} scale={scale()} seed={seed()} torch={torch.__version__}"


def make_config(cls: type[T], overrides: dict[str, Any] | None = None, path: str = "", **kwargs: Any) -> T:
    """Build the dataclass `cls` from overrides, rejecting keys it does not have.

    ``make_config(WorldConfig, image_size=64)`` works; ``make_config(WorldConfig, imagesize=64)``
    raises a ValueError naming the key's path and listing the valid keys, instead of a bare
    ``TypeError``. Nested dataclass fields accept dicts, checked the same way.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    values = {**(overrides or {}), **kwargs}
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = ", ".join(repr(f"{path}.{key}" if path else key) for key in unknown)
        raise ValueError(f"unknown key(s) {where} for {cls.__name__}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        kind = hints.get(name)
        where = f"{path}.{name}" if path else name
        if isinstance(value, dict) and dataclasses.is_dataclass(kind):
            # Start from the field's own default (e.g. ClapConfig's training has steps=200), not
            # from the nested class's defaults: a YAML section overrides only the keys it names.
            default = _field_default(fields[name])
            base = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            values[name] = make_config(kind, _merge(base, value), path=where)
        else:
            values[name] = _typed(value, kind, where, _field_default(fields[name]))
    return cls(**values)


def _typed(value: Any, kind: Any, where: str, default: Any) -> Any:
    """`value` if it fits the annotation `kind`, else a ValueError naming `where`, what it is and what to write.

    YAML reads ``1e-3`` (no dot) as a string: a float field takes such a string as the number it spells.
    """
    if value is None and default is None:
        return value
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return value
        kind = options[0] if len(options) == 1 else Any
    kind = typing.get_origin(kind) or kind
    fits = {bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
            float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
            str: lambda v: isinstance(v, str),
            tuple: lambda v: isinstance(v, (tuple, list)), list: lambda v: isinstance(v, (tuple, list)),
            dict: lambda v: isinstance(v, dict)}
    if dataclasses.is_dataclass(kind):
        fits[kind] = lambda v: isinstance(v, kind)
    if kind not in fits or fits[kind](value):
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    wanted = {bool: "true or false", int: "a whole number (e.g. 12, not 12.5 or '12')", float: "a number (e.g. 0.001)",
              str: "a string", tuple: "a list (e.g. [32, 64])", list: "a list (e.g. [32, 64])",
              dict: "a mapping (e.g. {image: 600})"}.get(kind, f"a {getattr(kind, '__name__', kind)} section (a mapping of its keys)")
    if kind is str and isinstance(value, bool):
        wanted += " (YAML reads a bare no, yes, off or on as false or true: quote it, e.g. 'no')"
    raise ValueError(f"{where} is {value!r} ({type(value).__name__}), but it must be {wanted}")


def _field_default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied, nested dicts merged key by key."""
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


# Per-scale settings live in configs/<scale>.yaml, one section per component. Each module that
# reads a section registers its dataclass here, so a file can be checked as a whole.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SECTIONS: dict[str, type] = {}


CHECKS: list = []  # functions (scale name) -> None that raise on sizes that do not fit across sections


def register_check(check):
    """Declare a check across sections (a projector's output against its decoder's input, ...)."""
    CHECKS.append(check)
    return check


def register_section(name: str, cls: type) -> type:
    """Declare that ``configs/<scale>.yaml`` may hold a section `name` shaped like dataclass `cls`."""
    SECTIONS[name] = cls
    return cls


def _read_yaml(path: Path) -> dict:
    """The sections of one YAML config file, or an error that names the file and the line."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}{line} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of sections (e.g. 'llm: {{steps: 100}}'), got {type(data).__name__}")
    for section, values in data.items():
        if values is not None and not isinstance(values, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping of keys (e.g. '{section}: {{steps: 100}}'), "
                             f"got {values!r}")
    return data


def user_config_file() -> Path | None:
    """The file ``MMLIB_CONFIG_FILE`` names (checked to exist), or None."""
    if not os.environ.get("MMLIB_CONFIG_FILE"):
        return None
    path = Path(os.environ["MMLIB_CONFIG_FILE"])
    if not path.is_file():
        raise FileNotFoundError(f"MMLIB_CONFIG_FILE={path} is not a file")
    return path


def source_name(scale_name: str) -> str:
    """How errors name the settings in use: ``tiny.yaml``, or ``mine.yaml`` when ``MMLIB_CONFIG_FILE`` adds one."""
    mine = user_config_file()
    return mine.name if mine else f"{check_scale(scale_name)}.yaml"


_CHECKED_USER_FILES: set = set()


def _check_user_file(path: Path, data: dict) -> None:
    """Sections, keys and types of a user's file, checked once per version of it, named by its path."""
    import importlib

    import mmlib

    stamp = (str(path.resolve()), path.stat().st_mtime_ns, path.stat().st_size)
    if stamp in _CHECKED_USER_FILES:
        return
    _CHECKED_USER_FILES.add(stamp)  # first, so that a check reading a section does not recurse
    try:
        for module in mmlib.LESSON_MODULES:  # each registers the sections it reads
            importlib.import_module(module)
        for section, values in data.items():
            if section not in SECTIONS:
                raise ValueError(f"{path}: unknown section {section!r}; known sections: {', '.join(SECTIONS)}")
            make_config(SECTIONS[section], values or {}, path=f"{path.name}:{section}")
    except Exception:
        _CHECKED_USER_FILES.discard(stamp)
        raise


def _read_scale_file(scale_name: str) -> dict:
    """``configs/<scale>.yaml``, with ``MMLIB_CONFIG_FILE``'s sections merged over it key by key."""
    path = CONFIG_DIR / f"{check_scale(scale_name)}.yaml"
    data = _read_yaml(path) if path.exists() else {}
    mine = user_config_file()
    if mine is None:
        return data
    overrides = _read_yaml(mine)
    _check_user_file(mine, overrides)
    return _merge(data, {section: values or {} for section, values in overrides.items()})


# What the zoo's training runs read: a stack of sets of (kind, name) records, one per entry in
# training (the innermost gets each read), so that `mmlib.zoo` can check that an entry declares
# every config section, data file and other entry its training depends on.
_READ_LOGS: list[set] = []


@contextlib.contextmanager
def recording_reads():
    """Collect, in the set it yields, the ``(kind, name)`` of every `note_read` inside the block."""
    log: set = set()
    _READ_LOGS.append(log)
    try:
        yield log
    finally:
        _READ_LOGS.pop()


def note_read(kind: str, name: str) -> None:
    """Record that a ``section``, ``file`` (under data/) or zoo ``entry`` was read (see `recording_reads`)."""
    if _READ_LOGS:
        _READ_LOGS[-1].add((kind, name))


def section_values(section: str, scale_name: str | None = None) -> dict:
    """The settings `section` of the scale's config file gives (``{}`` where it is silent)."""
    return _read_scale_file(scale() if scale_name is None else scale_name).get(section) or {}


def scale_config(section: str, cls: type[T], scale_name: str | None = None) -> T:
    """The dataclass `cls` for `section` of ``configs/<scale>.yaml`` (defaults where it is silent)."""
    scale_name = scale() if scale_name is None else scale_name
    note_read("section", section)
    values = section_values(section, scale_name)
    return make_config(cls, values, path=f"{source_name(scale_name)}:{section}")


def check_config_file(scale_name: str) -> None:
    """Validate every section of ``configs/<scale>.yaml``: unknown sections or keys, and sizes that do not fit, raise."""
    import importlib

    import mmlib

    for module in mmlib.LESSON_MODULES:  # each registers the sections it reads
        importlib.import_module(module)
    for section, values in _read_scale_file(scale_name).items():
        if section not in SECTIONS:
            raise ValueError(f"{source_name(scale_name)}: unknown section {section!r}; known sections: {', '.join(SECTIONS)}")
        make_config(SECTIONS[section], values or {}, path=f"{source_name(scale_name)}:{section}")
    for check in CHECKS:
        check(scale_name)
