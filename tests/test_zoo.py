import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmlib import zoo
from mmlib.data import World

CALLS = []


def train_color_probe(folder: Path) -> None:
    """A real, tiny component: a linear probe from an image's mean color to its color attribute."""
    CALLS.append(folder)
    world = World()
    index = world.split("train", 512)
    features = torch.from_numpy(world.image(index)).amax(dim=(2, 3))  # (B, 3) brightest color
    labels = torch.from_numpy(world.scenes(index).attributes["color"])
    probe = torch.nn.Linear(3, 6)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.1)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(probe(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_file(probe.state_dict(), folder / "probe.safetensors")
    (folder / "config.json").write_text(json.dumps({"in_features": 3, "out_features": 6}))


def load_color_probe(folder: Path) -> torch.nn.Linear:
    config = json.loads((folder / "config.json").read_text())
    probe = torch.nn.Linear(config["in_features"], config["out_features"])
    probe.load_state_dict(load_file(folder / "probe.safetensors"))
    return probe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIB_CACHE", str(tmp_path))
    monkeypatch.setenv("MMLIB_SEED", "0")
    CALLS.clear()
    zoo.entry("test-color-probe", load=load_color_probe, description="test only")(train_color_probe)
    yield tmp_path
    zoo.unregister("test-color-probe")


def test_trains_once_then_loads(cache):
    probe = zoo.load("test-color-probe")
    assert len(CALLS) == 1
    world = World()
    index = world.split("test", 256)
    features = torch.from_numpy(world.image(index)).amax(dim=(2, 3))
    accuracy = (probe(features).argmax(1) == torch.from_numpy(world.scenes(index).attributes["color"])).float().mean()
    assert accuracy > 0.9, "the trained component really learned"
    again = zoo.load("test-color-probe")
    assert len(CALLS) == 1, "the second load comes from the cache"
    assert torch.equal(again.weight, probe.weight)
    folder = zoo.folder("test-color-probe")
    assert folder.parent == cache / "zoo" / "test-color-probe"
    assert folder.name == f"tiny-seed0-v1-{zoo.fingerprint('test-color-probe')}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"probe.safetensors", "config.json"}
    assert not list(folder.parent.glob("*.partial-*"))


def test_training_is_deterministic(cache):
    first = zoo.load("test-color-probe")
    zoo.clear("test-color-probe")
    second = zoo.load("test-color-probe")
    assert len(CALLS) == 2
    assert torch.equal(first.weight, second.weight)


def test_seed_and_scale_get_their_own_entries(cache, monkeypatch):
    zoo.ensure("test-color-probe")
    monkeypatch.setenv("MMLIB_SEED", "1")
    assert zoo.folder("test-color-probe").name.startswith("tiny-seed1-v1-")
    zoo.ensure("test-color-probe")
    monkeypatch.setenv("MMLIB_SCALE", "small")
    assert zoo.folder("test-color-probe").name.startswith("small-seed1-v1-")
    assert len(CALLS) == 2


def read_value(folder: Path):
    return json.loads((folder / "value.json").read_text())


def test_a_changed_config_section_trains_new_entries_down_the_line(cache, monkeypatch, tmp_path):
    from mmlib import config
    from mmlib.judge import JudgeConfig

    calls = []

    def train_base(folder: Path) -> None:  # reads a config section, as the lesson entries do
        calls.append("base")
        (folder / "value.json").write_text(json.dumps(config.scale_config("judge", JudgeConfig).lr))

    def train_top(folder: Path) -> None:  # builds on another entry
        calls.append("top")
        (folder / "value.json").write_text(json.dumps(2 * zoo.load("test-base")))

    zoo.entry("test-base", load=read_value, sections=("judge",))(train_base)
    zoo.entry("test-top", load=read_value, needs=("test-base",))(train_top)
    try:
        assert zoo.load("test-top") == 2 * JudgeConfig().lr
        default = zoo.folder("test-base"), zoo.folder("test-top")
        mine = tmp_path / "mine.yaml"
        mine.write_text("judge: {lr: 0.25}\n")
        monkeypatch.setenv("MMLIB_CONFIG_FILE", str(mine))
        assert zoo.load("test-top") == 0.5, "the changed setting is used, not the entry trained before it"
        assert zoo.folder("test-base") != default[0] and zoo.folder("test-top") != default[1]
        assert calls == ["top", "base", "top", "base"]
        mine.write_text("judge: {lr: 0.25}\nclip: {training: {steps: 5}}\n")  # a section neither reads
        assert zoo.load("test-top") == 0.5 and len(calls) == 4
        monkeypatch.delenv("MMLIB_CONFIG_FILE")  # undone: the first entries are still cached
        assert zoo.load("test-top") == 2 * JudgeConfig().lr and len(calls) == 4
        zoo.entry("test-base", load=read_value, version=2, sections=("judge",))(train_base)  # its recipe changed
        assert zoo.folder("test-top") != default[1], "what builds on a retrained entry retrains too"
        assert zoo.load("test-top") == 2 * JudgeConfig().lr and calls[4:] == ["top", "base"]
        manifest = json.loads((default[0] / "manifest.json").read_text())
        assert manifest["settings"]["sections"] == {"judge": {}}
    finally:
        zoo.unregister("test-base")
        zoo.unregister("test-top")


def test_training_that_reads_what_it_does_not_declare_is_refused(cache):
    from mmlib import config
    from mmlib.judge import JudgeConfig

    def reads_a_section(folder: Path) -> None:
        (folder / "value.json").write_text(json.dumps(config.scale_config("judge", JudgeConfig).lr))

    def loads_an_entry(folder: Path) -> None:
        (folder / "value.json").write_text(json.dumps(zoo.load("test-color-probe").out_features))

    zoo.entry("test-reads", load=read_value)(reads_a_section)
    zoo.entry("test-loads", load=read_value)(loads_an_entry)
    try:
        with pytest.raises(RuntimeError, match=r"'test-reads'.*\(sections: 'judge'\).*Add them"):
            zoo.ensure("test-reads")
        with pytest.raises(RuntimeError, match=r"'test-loads'.*\(needs: 'test-color-probe'\)"):
            zoo.ensure("test-loads")
        assert zoo.problem(zoo.folder("test-reads")) == "missing", "nothing is published"
        zoo.entry("test-loads", load=read_value, needs=("test-color-probe",))(loads_an_entry)
        assert zoo.load("test-loads") == 6
    finally:
        zoo.unregister("test-reads")
        zoo.unregister("test-loads")


def test_the_stage3_entries_follow_the_dialogue_templates():
    # lesson 6's exercise edits data/dialogues/templates.yaml: the entries trained on it must change
    assert "dialogues/templates.yaml" in zoo.settings("stage3")["files"]
    assert "dialogues/templates.yaml" not in zoo.settings("stage2")["files"]
    assert set(zoo.settings("stage3")["needs"]) == {"stage2"}


def test_corrupt_file_is_detected_and_retrained(cache):
    folder = zoo.ensure("test-color-probe")
    weights = folder / "probe.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    assert "does not match its checksum" in zoo.problem(folder)
    with pytest.warns(UserWarning, match="damaged .*probe.safetensors does not match its checksum"):
        probe = zoo.load("test-color-probe")
    assert len(CALLS) == 2 and zoo.problem(folder) is None
    assert isinstance(probe, torch.nn.Linear)


def test_half_written_entry_is_retrained(cache):
    folder = zoo.ensure("test-color-probe")
    (folder / "manifest.json").unlink()  # as if training died before finishing
    assert zoo.problem(folder) == "no manifest (training never finished)"
    with pytest.warns(UserWarning, match="training never finished"):
        zoo.ensure("test-color-probe")
    (folder / "config.json").unlink()
    assert zoo.problem(folder) == "config.json is missing"
    with pytest.warns(UserWarning):
        zoo.load("test-color-probe")
    assert len(CALLS) == 3


@pytest.mark.parametrize("files", [["probe.safetensors"], {"../../elsewhere": "0" * 64}, "probe.safetensors"])
def test_a_manifest_whose_files_are_not_a_mapping_retrains(cache, files):
    folder = zoo.ensure("test-color-probe")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    assert zoo.problem(folder).startswith("unreadable manifest")
    with pytest.warns(UserWarning, match="damaged .*unreadable manifest"):
        zoo.load("test-color-probe")
    assert len(CALLS) == 2 and zoo.problem(folder) is None


def test_waiting_on_another_process_says_so(cache, capsys):
    import threading

    from filelock import FileLock

    target = zoo.folder("test-color-probe")
    target.parent.mkdir(parents=True, exist_ok=True)
    other = FileLock(str(target) + ".lock")  # as another process training it holds it
    other.acquire()
    waiting = threading.Thread(target=zoo.ensure, args=("test-color-probe",), kwargs={"progress": False}, daemon=True)
    try:
        waiting.start()
        said = ""
        for _ in range(60):  # the message comes after a 2 s try
            waiting.join(timeout=1)
            said += capsys.readouterr().out
            if "another process" in said:
                break
        assert waiting.is_alive(), "it waits for the lock"
        assert "another process is training 'test-color-probe'" in said
    finally:
        other.release()
    waiting.join(timeout=60)
    assert not waiting.is_alive() and zoo.problem(target) is None


def test_failed_training_leaves_nothing_behind(cache):
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise RuntimeError("out of memory")

    zoo.entry("test-broken", load=lambda folder: None)(broken)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            zoo.ensure("test-broken")
        assert zoo.problem(zoo.folder("test-broken")) == "missing"
        assert not list((cache / "zoo" / "test-broken").glob("*.partial-*"))
    finally:
        zoo.unregister("test-broken")


def test_unknown_entry_lists_valid_names(cache):
    with pytest.raises(ValueError, match="unknown zoo entry 'nope'; valid entries: .*test-color-probe"):
        zoo.load("nope")


HELPER = """
import sys, time
from pathlib import Path
from mmlib import zoo

def train(folder: Path) -> None:
    with open(sys.argv[1], "a") as log:
        log.write("trained\\n")
    time.sleep(1.5)  # long enough for the other process to arrive and wait on the lock
    (folder / "weights.bin").write_bytes(b"0123")

zoo.entry("test-locked", load=lambda folder: (folder / "weights.bin").read_bytes())(train)
assert zoo.load("test-locked") == b"0123"
"""


def test_two_processes_train_an_entry_once(cache, tmp_path):
    script = tmp_path / "helper.py"
    script.write_text(textwrap.dedent(HELPER))
    log = tmp_path / "log.txt"
    processes = [subprocess.Popen([sys.executable, str(script), str(log)]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    assert log.read_text().count("trained") == 1


def _write_order(folder: Path) -> None:
    """A test entry that appends its name to order.log when it trains."""
    with open(Path(zoo.cache_dir()) / "order.log", "a") as log:
        log.write(f"{folder.parent.name}\n")
    (folder / "done.txt").write_text("ok")


@pytest.fixture
def chain(cache):
    """Four test entries: a <- b, a <- c, (b, c) <- d; and one that fails."""
    for name, needs in (("test-a", ()), ("test-b", ("test-a",)), ("test-c", ("test-a",)), ("test-d", ("test-b", "test-c"))):
        zoo.entry(name, load=lambda folder: folder, needs=needs)(_write_order)

    def fail(folder: Path) -> None:
        raise RuntimeError("this entry cannot train")

    zoo.entry("test-fails", load=lambda folder: folder, needs=("test-a",))(fail)
    yield cache
    for name in ("test-a", "test-b", "test-c", "test-d", "test-fails"):
        zoo.unregister(name)


def test_plan_lists_needs_first(chain):
    order = zoo.plan(["test-d"])
    assert order[0] == "test-a" and order[-1] == "test-d" and set(order) == {"test-a", "test-b", "test-c", "test-d"}
    assert zoo.plan(["test-b", "test-d"]).count("test-a") == 1


def test_plan_refuses_a_cycle(chain):
    zoo.entry("test-loop", load=lambda folder: folder, needs=("test-loop-2",))(_write_order)
    zoo.entry("test-loop-2", load=lambda folder: folder, needs=("test-loop",))(_write_order)
    try:
        with pytest.raises(ValueError, match="cycle: test-loop -> test-loop-2 -> test-loop"):
            zoo.plan(["test-loop"])
    finally:
        zoo.unregister("test-loop")
        zoo.unregister("test-loop-2")


@pytest.mark.parametrize("jobs", [1, 2])
def test_build_trains_in_dependency_order(chain, jobs, capsys):
    zoo.build(["test-d"], jobs=jobs)
    order = (zoo.cache_dir() / "order.log").read_text().split()
    assert order[0] == "test-a" and order[-1] == "test-d" and sorted(order) == ["test-a", "test-b", "test-c", "test-d"]
    assert all(zoo.problem(zoo.folder(name)) is None for name in order)
    zoo.build(["test-d"], jobs=jobs)  # everything cached: nothing trains again
    assert len((zoo.cache_dir() / "order.log").read_text().split()) == 4
    assert "4 of 4 entries cached; training nothing" in capsys.readouterr().out


def test_build_stops_at_a_failure_and_names_it(chain):
    with pytest.raises(RuntimeError, match="training test-fails failed"):
        zoo.build(["test-fails", "test-d"], jobs=2)
    assert zoo.problem(zoo.folder("test-fails")) is not None


def test_build_refuses_bad_jobs(chain):
    for jobs in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="jobs is how many entries train at once"):
            zoo.build(["test-a"], jobs=jobs)


def test_zoo_command_line_refuses_unknown_entries_and_jobs():
    for arguments, message in ((["no-such-entry"], "unknown zoo entry 'no-such-entry'"), (["--jobs", "0", "tokenizer"],
                                                                                          "--jobs must be at least 1")):
        result = subprocess.run([sys.executable, "-m", "mmlib.zoo", *arguments], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr
