"""`python -m mmlib.train`: accelerate runs of the three stages, checkpoints, resume, sizes, configs.

The runs use the tiny config and the zoo's entries (make test trains them first); a few steps each.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from mmlib import config as course_config
from mmlib.contrastive import History
from mmlib.train import TrainConfig, load_checkpoint, run, save_checkpoint, stage_sizes, use_config

ROOT = Path(__file__).resolve().parents[1]
RESULT = {1: "stage1.json", 2: "stage2.json", 3: "stage3.json"}


def curve(folder: Path, stage: int, name: str = "total") -> list[float]:
    return json.loads((folder / f"stage{stage}" / "final" / RESULT[stage]).read_text())["history"]["loss"][name]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MMLIB_PROGRESS", "0")


def test_two_processes_take_the_same_steps_as_one(tmp_path, tiny_run):
    """accelerate launch with 2 CPU processes, each on half of every global batch, against one process.

    Tolerance: 1e-4 relative on every step's loss (measured: 1e-7; the two runs differ only in the
    order of float sums). Stage 3's terms average over uneven shares and are weighted to match.
    """
    one_run = tiny_run[0]
    # CPU processes even on a machine with a GPU (there, rank 1 would otherwise look for a second GPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMLIB_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "mmlib.train", "--stage", "1", "2", "3",
              "--steps", "3", "--output", str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 3: 3 steps" in done.stdout
    for stage in (1, 2, 3):
        one, two = curve(one_run, stage), curve(tmp_path / "two", stage)
        assert len(one) == len(two) == 3
        assert one == pytest.approx(two, rel=1e-4), (stage, one, two)
    assert curve(one_run, 3, "video alignment") == pytest.approx(curve(tmp_path / "two", 3, "video alignment"), rel=1e-4)


def test_two_processes_share_stage_3s_replay_term_as_one(tmp_path, monkeypatch):
    """Stage 3 with the opt-in "replay" term (stage 1's captions): each process takes its share of
    the replay batch (2 and 3 of 5 rows: uneven, so the weighting counts), as for the other terms;
    2 CPU processes give the one-process curve."""
    tiny = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    tiny["stage3"] = {**(tiny.get("stage3") or {}), "terms": ["answer", "alignment", "replay"], "replay_batch": 5}
    config = tmp_path / "replay.yaml"
    config.write_text(yaml.safe_dump(tiny))
    monkeypatch.setenv("MMLIB_CONFIG_FILE", str(config))
    monkeypatch.setenv("MMLIB_DEVICE", "cpu")
    one = run(3, tmp_path / "one", steps=2).loss
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "-m", "mmlib.train", "--stage", "3",
              "--steps", "2", "--output", str(tmp_path / "two")]
    done = subprocess.run(launch, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two/stage3/final/stage3.json").read_text())["history"]["loss"]
    assert len(one["replay"]) == 2 and one["replay"] == pytest.approx(two["replay"], rel=1e-4)
    assert one["total"] == pytest.approx(two["total"], rel=1e-4)


def test_gradient_accumulation_takes_the_same_steps(tmp_path):
    run(1, tmp_path / "plain", steps=3, train=TrainConfig())
    run(1, tmp_path / "accumulated", steps=3, train=TrainConfig(gradient_accumulation_steps=2))
    plain, accumulated = (load_file(tmp_path / name / "final" / "input_projection.safetensors")
                          for name in ("plain", "accumulated"))
    for key in plain:
        # Adam divides by sqrt(v): where a gradient is as small as float rounding, one batch and two
        # half batches can step that coordinate differently, so a few in 10,000 may differ
        close = torch.isclose(plain[key], accumulated[key], rtol=1e-4, atol=1e-6)
        assert close.float().mean() >= 0.9999, (key, int((~close).sum()), close.numel())
    one = json.loads((tmp_path / "plain/final/stage1.json").read_text())["history"]["loss"]["total"]
    two = json.loads((tmp_path / "accumulated/final/stage1.json").read_text())["history"]["loss"]["total"]
    assert one == pytest.approx(two, rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_continues_the_same_loss_curve(tmp_path, stage):
    train = TrainConfig(checkpoint_every=2)
    whole = run(stage, tmp_path / "run", steps=4, train=train).loss["total"]
    assert (tmp_path / "run/checkpoint-2/trainable.safetensors").exists()
    first = {k: v.clone() for k, v in load_file(next((tmp_path / "run/final").glob("*.safetensors"))).items()}
    shutil.rmtree(tmp_path / "run/final")  # as if the run had stopped after its checkpoint at step 2
    resumed = run(stage, tmp_path / "run", steps=4, resume=True, train=train)
    assert len(resumed.loss["total"]) == 4
    assert resumed.loss["total"] == pytest.approx(whole, rel=1e-6)
    again = load_file(next((tmp_path / "run/final").glob("*.safetensors")))
    for key, value in first.items():
        torch.testing.assert_close(again[key], value)


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(1, tmp_path / "empty", steps=2, resume=True)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    save_checkpoint(tmp_path / "c", model, optimizer, schedule, 1, History())
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(tmp_path / "c", other, torch.optim.AdamW(other.parameters()), schedule)
    wider = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="weight"):
        load_checkpoint(tmp_path / "c", wider, torch.optim.AdamW(wider.parameters()), schedule)


def test_a_batch_that_does_not_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"stage1.batch_size .* must divide"):
        run(1, tmp_path, steps=1, train=TrainConfig(gradient_accumulation_steps=5))


def test_later_stages_at_full_scale_need_the_previous_result(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLIB_SCALE", "full")
    with pytest.raises(ValueError, match="--init"):
        run(2, tmp_path, steps=1)


def test_full_scale_sizes_per_stage_match_nextgpt():
    """Built on the meta device from configs/full.yaml alone; NExT-GPT's published sizes beside."""
    sizes = stage_sizes("full")
    assert sizes["input projection"] == 1024 * 4096 + 4096 == 4_198_400  # NExT-GPT: 4.2M
    for modality in ("image", "audio", "video"):
        assert 30e6 < sizes[f"projector {modality}"] < 33e6  # NExT-GPT: about 32M each
    assert sizes["lora"] == 33_554_432  # NExT-GPT: 33.5M (r=32 on q, k, v, o of 32 layers)
    assert sizes["llm"] == 6_738_415_616 + sizes["signal rows"]  # Vicuna-7B: 6.7B, plus 36 signal tokens' rows
    assert sizes["stage1"]["trainable"] == sizes["input projection"]
    projectors = sum(sizes[f"projector {m}"] for m in ("image", "audio", "video"))
    assert sizes["stage2"]["trainable"] == projectors + sizes["signal rows"]
    assert sizes["stage3"]["trainable"] == sizes["lora"] + sizes["signal rows"] + sizes["input projection"] + projectors
    assert sizes["stage3"]["total"] - sizes["stage1"]["total"] == sizes["lora"]


def test_every_scale_passes_the_schema_and_a_misfit_projector_is_named(tmp_path, monkeypatch):
    for scale in course_config.SCALES:
        course_config.check_config_file(scale)
    bad = (ROOT / "configs/full.yaml").read_text().replace("video: [77, 1024]", "video: [77, 768]")
    (tmp_path / "mine.yaml").write_text(bad)
    monkeypatch.setenv("MMLIB_CONFIG_FILE", "placeholder")  # restored after the test
    with pytest.raises(ValueError, match=r"stage2.conditioning.video is \[77, 768\].*cerspense.*\[77, 1024\]"):
        use_config(str(tmp_path / "mine.yaml"))
    (tmp_path / "typo.yaml").write_text("train: {mixed_precison: bf16}\n")
    with pytest.raises(ValueError, match="train.mixed_precison"):
        use_config(str(tmp_path / "typo.yaml"))
    with pytest.raises(FileNotFoundError, match="neither a scale"):
        use_config(str(tmp_path / "missing.yaml"))


def test_deepspeed_bf16_becomes_torch_autocast_and_fp16_is_left_alone():
    """DeepSpeed's bf16 casts the whole module (encoders and all) to bf16 and turns autocast off; mmlib.train asks for
    its torch_autocast section instead, as accelerate autocasts under DDP. On a CPU, and for fp16, nothing changes."""
    from mmlib.train import deepspeed_precision

    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert deepspeed_precision(ds, torch.device("cuda")) == {
        "bf16": {"enabled": False}, "zero_optimization": {"stage": 2},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}}
    on_cpu = {"bf16": {"enabled": True}}
    assert deepspeed_precision(on_cpu, torch.device("cpu")) == {"bf16": {"enabled": True}}
    fp16 = {"fp16": {"enabled": True, "loss_scale": 0}}
    assert deepspeed_precision(fp16, torch.device("cuda")) == {"fp16": {"enabled": True, "loss_scale": 0}}


def test_a_stage_killed_while_saving_leaves_no_final_and_resume_finishes_it(tmp_path, monkeypatch):
    import mmlib.input_projection
    from mmlib.train import run_stages

    train = TrainConfig(checkpoint_every=2)
    saved = mmlib.input_projection.save_stage1

    def killed(model, history, folder):  # the weights written, then the process dies before stage1.json
        saved(model, history, folder)
        (Path(folder) / "stage1.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(mmlib.input_projection, "save_stage1", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stages([1], tmp_path, steps=4, train=train)
    assert not (tmp_path / "stage1/final").exists() and not list((tmp_path / "stage1").glob("final.partial-*"))
    monkeypatch.setattr(mmlib.input_projection, "save_stage1", saved)
    (tmp_path / "stage1/final").mkdir()  # a final without its stage1.json (an interrupted copy) is not finished either
    resumed = run_stages([1], tmp_path, steps=4, resume=True, train=train)
    assert len(resumed[1].loss["total"]) == 4 and (tmp_path / "stage1/final/stage1.json").is_file()
    assert run_stages([1], tmp_path, steps=4, resume=True, train=train) == {}, "finished: skipped"


def test_an_output_that_cannot_be_a_folder_is_refused_before_training(tmp_path, monkeypatch):
    import mmlib.train
    from mmlib.train import run_stages

    def never(*args, **kwargs):
        raise AssertionError("trained before checking --output")

    monkeypatch.setattr(mmlib.train, "build_stage", never)
    (tmp_path / "notes.txt").write_text("")
    for output in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(NotADirectoryError, match="notes.txt is a file, not a folder"):
            run_stages([1], output, steps=2)
        with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
            run(1, output, steps=2)


def test_resume_from_a_mistyped_output_says_so_instead_of_starting_afresh(tmp_path):
    from mmlib.train import run_stages

    (tmp_path / "runs/nextgpt/stage1").mkdir(parents=True)  # a run that started (maybe not yet checkpointed)
    with pytest.raises(FileNotFoundError, match=r"--resume: .*nextgtp holds no stage1..stage3 folder of a run"):
        run_stages([1, 2, 3], tmp_path / "runs/nextgtp", steps=2, resume=True)
    with pytest.raises(FileNotFoundError, match="holds no stage2..stage3 folder"):
        run_stages([2, 3], tmp_path / "runs/nextgpt", steps=2, resume=True, init=str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        run_stages([1], tmp_path / "file", steps=2, resume=True)
