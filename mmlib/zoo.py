"""The zoo: a load-or-train cache of the course's trained tiny components.

Introduced in `00_tour.ipynb`. A later lesson calls ``zoo.load("name")`` to get a component an
earlier lesson trained, without re-running that notebook: the first call trains it with the same
code the lesson runs and stores it; every later call loads it in a second.

- An entry is registered by the module that owns its idea, with ``@zoo.entry(...)`` on a function
  that trains the component and writes it (safetensors, JSON configs, tokenizer files) into the
  folder it is given, and a `load` function that reads that folder back.
- Entries live under ``$MMLIB_CACHE/zoo/<name>/<scale>-seed<seed>-v<version>-<settings>/``
  (``MMLIB_CACHE`` defaults to the user cache dir). ``<settings>`` fingerprints what else the
  training depends on: the config sections the entry declares (as ``configs/<scale>.yaml``, with
  ``MMLIB_CONFIG_FILE`` layered over it, gives them), its data files, the world's caption files, and the
  versions and fingerprints of the entries it needs. Changing any of these, the scale, the seed
  or the entry's version trains a new one (the old one stays cached, for when the change is
  undone); nothing stale is ever loaded. An entry's training that reads a section, a data file
  or another entry it does not declare is an error, so every fresh zoo build checks the
  declarations.
- Training is seeded from the course seed, so it is deterministic; a file lock keeps two processes
  (two notebooks, two pytest workers) from training the same entry at once.
- A folder is published only once complete (written under a temporary name, then renamed), and
  every file's SHA-256 is checked against its manifest on load: a corrupt or half-written entry is
  deleted and trained again, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import platformdirs
from filelock import FileLock, Timeout

from mmlib import config as course_config

MANIFEST = "manifest.json"



@dataclass(frozen=True)
class Entry:
    """One trainable component: how to train it into a folder, and how to load it back."""

    name: str
    train: Callable[[Path], None]  # writes the trained component's files into the given folder
    load: Callable[[Path], Any]  # reads them back into a ready-to-use object
    version: int = 1  # bump when the training code changes, so caches retrain
    description: str = ""
    lesson: str = ""  # the notebook that teaches how it is trained
    sections: tuple = ()  # config sections its training reads (e.g. ("stage3",)), or only keys of one ("x.key")
    needs: tuple = ()  # the zoo entries its training loads
    files: tuple = ()  # files under data/ it reads besides the world's captions (e.g. "dialogues/templates.yaml")


_REGISTRY: dict[str, Entry] = {}


def entry(name: str, *, load: Callable[[Path], Any], version: int = 1, description: str = "", lesson: str = "",
          sections=(), needs=(), files=()):
    """Decorator registering a training function as zoo entry `name`, for example::

        @zoo.entry("my-model", load=load_my_model, lesson="01_contrastive_encoders.ipynb",
                   sections=("clip",), needs=("tokenizer",))
        def train_my_model(folder: Path) -> None:
            ...  # train, then model.save_pretrained(folder) or save_file(weights, folder / "x.safetensors")

    `sections`, `needs` and `files` declare what the training reads besides the code: config
    sections, other entries and files under data/. They are part of the entry's folder name
    (see the module), and training checks that nothing undeclared was read. ``"section.key"``
    fingerprints one key of a section: its other keys are settings read at use time, not trained
    (a decoder's sampler, say), and changing them trains nothing new.
    """

    def register(train: Callable[[Path], None]) -> Callable[[Path], None]:
        _REGISTRY[name] = Entry(name, train, load, version, description, lesson, tuple(sections), tuple(needs),
                                tuple(files))
        return train

    return register


def unregister(name: str) -> None:
    """Forget entry `name` (its cached files stay on disk)."""
    _REGISTRY.pop(name, None)


def _import_providers() -> None:
    """Import the lesson modules, whose ``@entry`` decorators register their components."""
    import mmlib

    for module in mmlib.LESSON_MODULES:
        importlib.import_module(module)


def names() -> list[str]:
    """The names of every registered entry."""
    _import_providers()
    return sorted(_REGISTRY)


def get_entry(name: str) -> Entry:
    """The registered entry `name`, or a ValueError listing the valid names."""
    if name not in _REGISTRY:
        _import_providers()
    if name not in _REGISTRY:
        valid = ", ".join(sorted(_REGISTRY)) or "(none registered yet)"
        raise ValueError(f"unknown zoo entry {name!r}; valid entries: {valid}")
    return _REGISTRY[name]


def cache_dir() -> Path:
    """The zoo's root folder: ``$MMLIB_CACHE/zoo``, by default under the user cache dir."""
    root = os.environ.get("MMLIB_CACHE") or platformdirs.user_cache_dir("mmlib")
    return Path(root).expanduser() / "zoo"


def _data_path(relative: str) -> Path:
    from mmlib.data.captions import data_file

    return data_file(*relative.split("/"))


def settings(name: str) -> dict:
    """What entry `name`'s training depends on besides its code, as its fingerprint hashes it."""
    item = get_entry(name)
    from mmlib.data.captions import DATA_DIR

    world = sorted(str(p.relative_to(DATA_DIR)) for p in (DATA_DIR / "captions").glob("*") if p.is_file())
    return {
        "sections": {spec: _section_part(spec) for spec in item.sections},
        "files": {relative: _sha256(_data_path(relative)) for relative in sorted({*world, *item.files})},
        "needs": {need: f"v{get_entry(need).version}-{fingerprint(need)}" for need in item.needs},
    }


def _section_part(spec: str):
    """The settings a ``sections`` spec names: a whole section, or one key of it ("section.key")."""
    section, _, key = spec.partition(".")
    values = course_config.section_values(section)
    return values.get(key) if key else values


def _digest(recorded: dict) -> str:
    return hashlib.sha256(json.dumps(recorded, sort_keys=True, default=str).encode()).hexdigest()[:8]


def fingerprint(name: str) -> str:
    """Eight hex digits that change whenever entry `name`'s declared settings (`settings`) change."""
    return _digest(settings(name))


def _folder_for(name: str, recorded: dict) -> Path:
    version = get_entry(name).version
    return cache_dir() / name / f"{course_config.scale()}-seed{course_config.seed()}-v{version}-{_digest(recorded)}"


def folder(name: str) -> Path:
    """Where entry `name` lives for the current scale, seed and settings (whether or not it exists yet)."""
    return _folder_for(name, settings(name))


def _closure(name: str) -> tuple[set, set, set]:
    """The sections, entries and files entry `name` may read: its own and those of what it needs."""
    item = get_entry(name)
    sections, entries, files = {spec.partition(".")[0] for spec in item.sections}, set(item.needs), set(item.files)
    for need in item.needs:
        more = _closure(need)
        sections |= more[0]
        entries |= more[1]
        files |= more[2]
    return sections, entries, files


def _check_reads(name: str, reads: set) -> None:
    """Raise if training `name` read a section, entry or data file its registration does not declare."""
    allowed = dict(zip(("section", "entry", "file"), _closure(name)))
    keyword = {"section": "sections", "entry": "needs", "file": "files"}
    missing = sorted((kind, what) for kind, what in reads if what not in allowed[kind])
    if missing:
        listed = ", ".join(f"{keyword[kind]}: {what!r}" for kind, what in missing)
        raise RuntimeError(f"zoo entry {name!r}: its training read what its zoo.entry(...) does not declare ({listed}). "
                           "Add them there, so that a change to them trains a new entry instead of loading this one.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(target: Path, item: Entry, seconds: float, recorded: dict) -> None:
    files = sorted(p for p in target.rglob("*") if p.is_file())
    if not files:
        raise RuntimeError(f"zoo entry {item.name!r}: its train function wrote no files into {target}")
    manifest = {
        "name": item.name,
        "version": item.version,
        "scale": course_config.scale(),
        "seed": course_config.seed(),
        "settings": recorded,  # what the folder name fingerprints
        "train_seconds": round(seconds, 2),
        "files": {str(p.relative_to(target)): _sha256(p) for p in files},
    }
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))


def problem(path: Path) -> str | None:
    """Why the entry folder at `path` cannot be loaded, or None if it is complete and intact."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        return "missing"
    if not manifest_path.is_file():
        return "no manifest (training never finished)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and ".." not in Path(k).parts
                                              and not Path(k).is_absolute() for k, v in files.items()):
        return "unreadable manifest (its files are not a mapping of relative paths to checksums)"
    for relative, digest in files.items():
        file = path / relative
        if not file.is_file():
            return f"{relative} is missing"
        if _sha256(file) != digest:
            return f"{relative} does not match its checksum"
    return None


@contextmanager
def _locked(path: Path, name: str):
    """Hold the entry's file lock; while another process holds it, say so once, then wait."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=2)
    except Timeout:
        print(f"zoo: another process is training {name!r} (lock {path}); waiting for it to finish", flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def ensure(name: str, progress: bool = True) -> Path:
    """Train entry `name` unless an intact copy is cached; return its folder."""
    item = get_entry(name)
    course_config.note_read("entry", name)
    recorded = settings(name)  # read once: the folder name and the manifest agree
    target = _folder_for(name, recorded)
    if problem(target) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(Path(str(target) + ".lock"), name):
        reason = problem(target)  # another process may have finished it while we waited
        if reason is None:
            return target
        if reason != "missing":
            warnings.warn(f"zoo entry {name!r} at {target} is damaged ({reason}); training it again")
            shutil.rmtree(target)
        for leftover in target.parent.glob(target.name + ".partial-*"):  # from a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        partial.mkdir()
        if progress:
            print(f"zoo: training {name!r} (first use at this scale, seed and settings; cached in {target})", flush=True)
        start = time.perf_counter()
        try:
            course_config.seed_everything()
            with course_config.recording_reads() as reads, course_config.one_thread():
                item.train(partial)
            _check_reads(name, reads)
            _write_manifest(partial, item, time.perf_counter() - start, recorded)
            os.replace(partial, target)  # atomic: the folder appears complete or not at all
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def load(name: str) -> Any:
    """The trained component `name`: loaded from the cache, trained first if it is not there."""
    return get_entry(name).load(ensure(name))


@contextmanager
def quiet_loading():
    """Hide transformers' and diffusers' "Loading weights" bars: loading a zoo entry takes a blink."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # diffusers is only needed from lesson 3 on
        diffusers_logging = None
    if diffusers_logging:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.enable_progress_bar()
        if diffusers_logging:
            diffusers_logging.enable_progress_bar()


def clear(name: str | None = None) -> None:
    """Delete the cached copies of entry `name` (all scales and seeds), or of every entry."""
    root = cache_dir() if name is None else cache_dir() / get_entry(name).name
    shutil.rmtree(root, ignore_errors=True)


def plan(names) -> list[str]:
    """`names` and every entry they need, each listed after its needs (a topological order)."""
    order: list[str] = []

    def visit(name: str, path: tuple) -> None:
        if name in path:
            raise ValueError(f"zoo entries need each other in a cycle: {' -> '.join(path + (name,))}")
        if name not in order:
            for need in get_entry(name).needs:
                visit(need, path + (name,))
            order.append(name)

    for name in names:
        visit(name, ())
    return order


def _dependents(order: list[str]) -> dict[str, int]:
    """How many entries of `order` wait, directly or not, on each one: the scheduler starts the most awaited first."""
    waiting = {name: set() for name in order}
    for name in reversed(order):  # an entry's dependents are all listed after it
        for need in get_entry(name).needs:
            waiting[need] |= {name} | waiting[name]
    return {name: len(waiting[name]) for name in order}


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _train_one(name: str, line: int) -> None:
    """A worker process of `build`: train one entry, its progress bar on line `line`."""
    os.environ["MMLIB_PROGRESS_LINE"] = str(line)
    ensure(name, progress=False)


def build(names, jobs: int = 1, progress: bool = True) -> None:
    """Train `names` and everything they need unless cached, `jobs` entries at a time.

    Training runs on one thread (`mmlib.config.one_thread`: the weights must not depend on the
    machine), so ``jobs`` up to the number of cores is what uses them: each entry then trains in a
    worker process of its own, started as soon as the entries it needs are ready, the most awaited
    first. A failure stops new starts; the workers running finish, then it raises.
    """
    import multiprocessing
    import sys

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs is how many entries train at once, a whole number >= 1; got {jobs!r}")
    order = plan(names)
    waiting = [name for name in order if problem(folder(name)) is not None]
    say = print if progress else (lambda *args, **kwargs: None)
    say(f"zoo: {len(order) - len(waiting)} of {len(order)} entries cached; training {', '.join(waiting) or 'nothing'}"
        + (f", {jobs} at a time" if jobs > 1 and len(waiting) > 1 else ""), flush=True)
    if jobs == 1 or len(waiting) <= 1:
        for name in waiting:
            start = time.perf_counter()
            say(f"zoo: training {name}", flush=True)
            ensure(name, progress=False)
            say(f"zoo: {name} ready ({time.perf_counter() - start:.0f} s)", flush=True)
        return
    # fork where there is one: a worker starts with mmlib already imported (a new interpreter takes ~10 s)
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    awaited = _dependents(order)
    running: dict[str, tuple] = {}  # name -> (process, progress line, start time)
    done, failed, last_report = set(order) - set(waiting), [], time.perf_counter()
    while waiting or running:
        ready = [n for n in waiting if all(need in done for need in get_entry(n).needs)]
        while ready and len(running) < jobs and not failed:
            name = max(ready, key=lambda n: (awaited[n], -order.index(n)))
            ready.remove(name)
            waiting.remove(name)
            line = min(set(range(jobs)) - {line for _, line, _ in running.values()})
            process = context.Process(target=_train_one, args=(name, line), name=f"zoo-{name}")
            process.start()
            running[name] = (process, line, time.perf_counter())
            say(f"zoo: training {name}", flush=True)
        if not running:
            if failed:
                break
            raise RuntimeError(f"zoo entries {', '.join(waiting)} wait on entries that are not being built")
        time.sleep(0.5)
        for name, (process, _, start) in list(running.items()):
            if process.is_alive():
                continue
            process.join()
            del running[name]
            if process.exitcode:
                failed.append(name)
            else:
                done.add(name)
                say(f"zoo: {name} ready ({time.perf_counter() - start:.0f} s); {len(done)} of {len(order)} entries",
                    flush=True)
        if running and time.perf_counter() - last_report > 60:
            last_report = time.perf_counter()
            say("zoo: still training " + ", ".join(f"{n} ({last_report - t:.0f} s)" for n, (_, _, t) in running.items()),
                flush=True)
    if failed:
        skipped = f"; not started: {', '.join(waiting)}" if waiting else ""
        raise RuntimeError(f"zoo: training {', '.join(failed)} failed (its error is printed above){skipped}")


def main(argv: list[str] | None = None) -> None:
    """``python -m mmlib.zoo [--jobs N] [NAME ...]``: train the named entries (all if none) and what they need, unless cached."""
    import argparse
    import sys

    from mmlib import zoo  # under `python -m` this file is __main__; entries register in mmlib.zoo

    parser = argparse.ArgumentParser(prog="python -m mmlib.zoo", description=main.__doc__)
    parser.add_argument("names", nargs="*", help=f"entries to build, or 'all' (the default): {', '.join(zoo.names())}")
    parser.add_argument("--jobs", type=int, default=zoo.cores(),
                        help="entries trained at once, each in its own process (default: the number of cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    names = [] if args.names in ([], ["all"]) else args.names
    for name in names:
        if name not in zoo.names():
            parser.error(f"unknown zoo entry {name!r}; valid entries: {', '.join(zoo.names())} (or all)")
    try:
        zoo.build(names or zoo.names(), jobs=args.jobs, progress=True)
    except RuntimeError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
