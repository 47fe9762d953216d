import contextlib
import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from mmlib import config as course_config
from mmlib.data import ATTRIBUTES, HELDOUT_PAIRS, World
from mmlib.data.captions import parse_caption
from mmlib.input_projection import Stage1Config, caption_batch, train_stage1
from mmlib.instruction import (OUTPUT_TAG, UNKNOWN_FILL, DialogueError, LoraSettings, Stage3Config, add_lora, alignment_values, load_dialogues,
                               load_stage3, load_templates, make_dialogues, prepare_stage3, prompt_for, replay_loss,
                               run_dialogues, save_dialogues, save_stage3, stage3_losses, train_stage3,
                               trainable_parameters, training_examples)
from mmlib.llm import LLMConfig, llama_config
from mmlib.output_projection import Stage2Config, build_signal_llm, merge_signal_rows, train_stage2
from test_output_projection import TINY_STAGE2, base_model

# Templates whose inputs the tests' one-encoder (image) model can read.
IMAGE_TEMPLATES = ["describe-picture", "recolor-picture", "sound-of-picture", "move-clip", "see-then-draw"]
TINY_STAGE3 = dict(steps=4, batch_size=4, lr=1e-2, lora=LoraSettings(r=4, alpha=8),
                   terms=("answer", "alignment", "replay"), replay_batch=3)


def test_templates_split_into_train_and_held_out_and_every_answer_states_what_it_expects():
    templates = load_templates()
    assert templates["train"] and templates["test"] and not set(templates["train"]) & set(templates["test"])
    world = World(seed=0)
    for split in ("train", "test"):
        for dialogue in make_dialogues(world, split, 3 * len(templates[split])):
            assert dialogue.template in templates[split]
            for turn in dialogue.turns:
                stated = parse_caption(OUTPUT_TAG.sub("", turn.answer))
                assert all(turn.expect[a] == v for a, v in stated.items())  # the gold text is consistent
                assert turn.output is not None or stated == turn.expect
                assert turn.user.count("<") == len(turn.inputs)


def test_dialogues_are_seeded_use_their_splits_scenes_and_carry_edits():
    world = World(seed=0)
    a, b = make_dialogues(world, "test", 12, variant=3), make_dialogues(world, "test", 12, variant=3)
    assert [json.dumps(x.__dict__, default=vars) for x in a] == [json.dumps(x.__dict__, default=vars) for x in b]
    assert set(world.split("test", 12).tolist()) == {d.scene for d in a}
    recolor = make_dialogues(world, "train", 8, templates=["recolor-picture"])
    for dialogue in recolor:
        turn, original = dialogue.turns[0], world.scenes([dialogue.scene]).describe(0)
        assert turn.values["color"] != original["color"] and turn.expect["color"] == turn.values["color"]
        assert {k: v for k, v in turn.values.items() if k != "color"} == {k: v for k, v in original.items() if k != "color"}


def test_edits_never_make_a_held_out_shape_color_pair():
    world, held = World(seed=0), set(HELDOUT_PAIRS)
    edits = ["recolor-picture", "shape-then-reshape", "see-then-reshape"]  # color and shape edits
    for split in ("train", "test"):
        dialogues = make_dialogues(world, split, 600, templates=edits)
        assert not any((t.values["shape"], t.values["color"]) in held for d in dialogues for t in d.turns)
        changed = {(t.values["shape"], t.values["color"]) for d in dialogues for t in d.turns[-1:]}
        assert len(changed) == len(ATTRIBUTES["shape"]) * len(ATTRIBUTES["color"]) - len(held)  # every other pair is drawn


def test_dialogue_files_round_trip(tmp_path):
    dialogues = make_dialogues(World(seed=0), "test", 10)
    save_dialogues(dialogues, tmp_path / "d.jsonl")
    assert load_dialogues(tmp_path / "d.jsonl") == dialogues


@pytest.mark.parametrize("edit, reason", [
    (lambda t: t.update(user="<smell> describe it.", inputs=["smell"]), r":2, turn 1: unknown modality tag <smell>"),
    (lambda t: t.update(inputs=[]), r":2, turn 1: placeholder <image> has no input"),
    (lambda t: t.update(answer="[video]"), r":2, turn 1: the answer asks for \[video\], but the model has no video decoder"),
    (lambda t: t.update(answer="[depth]"), r":2, turn 1: unknown output \[depth\]"),
    (lambda t: t.update(expect={"color": "mauve"}), r":2, turn 1: expect has color='mauve'"),
    (lambda t: t.update(user=["<image>"]), r":2, turn 1: user must be a string, got \['<image>'\]"),
    (lambda t: t.update(inputs="image"), r":2, turn 1: inputs must be a list of modalities"),
    (lambda t: t.update(inputs=[3]), r":2, turn 1: inputs must be a list of modality names"),
    (lambda t: t.update(expect=["color"]), r":2, turn 1: expect must be an object of attribute values"),
    (lambda t: t.update(values={**t["values"], "color": 3}), r":2, turn 1: values has color=3"),
])
def test_a_bad_dialogue_file_is_rejected_with_the_line_and_the_reason(tmp_path, edit, reason):
    dialogues = make_dialogues(World(seed=0), "train", 2, templates=["describe-picture"])
    save_dialogues(dialogues, tmp_path / "d.jsonl")
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    edit(record["turns"][0])
    (tmp_path / "d.jsonl").write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DialogueError, match=reason):
        load_dialogues(tmp_path / "d.jsonl", outputs=("image", "audio"))


def test_dialogues_made_at_one_seed_are_refused_by_a_world_of_another(tmp_path):
    """A dialogue names its scene by index; at another seed that index shows another scene."""
    save_dialogues(make_dialogues(World(seed=0), "test", 12), tmp_path / "d.jsonl")
    assert all(json.loads(line)["seed"] == 0 for line in (tmp_path / "d.jsonl").read_text().splitlines())
    loaded = load_dialogues(tmp_path / "d.jsonl")
    for use in (training_examples, run_dialogues):  # refused before any model is run
        with pytest.raises(DialogueError, match=r"12 of 12 dialogues were made at seed 0, but the world is seed 1.*MMLIB_SEED=0"):
            use(None, World(seed=1), loaded)
    record = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    (tmp_path / "bad.jsonl").write_text(json.dumps({**record, "seed": "zero"}) + "\n")
    with pytest.raises(DialogueError, match=r"bad.jsonl:1: seed must be the world's seed"):
        load_dialogues(tmp_path / "bad.jsonl")
    del record["seed"]  # a hand-written dialogue without one is read at the world's seed
    (tmp_path / "mine.jsonl").write_text(json.dumps(record) + "\n")
    assert load_dialogues(tmp_path / "mine.jsonl")[0].seed is None


@pytest.mark.parametrize("change, reason", [
    ({"template": 3}, r"d.jsonl:1: template must be a string"),
    ({"scene": True}, r"d.jsonl:1: scene must be a scene index"),
    ({"turns": {}}, r"d.jsonl:1: turns must be a non-empty list"),
    ({"speaker": "me"}, r"d.jsonl:1: unknown key\(s\) \['speaker'\]"),
])
def test_a_dialogue_with_a_field_of_the_wrong_kind_is_rejected_with_the_line(tmp_path, change, reason):
    record = json.loads(json.dumps(asdict(make_dialogues(World(seed=0), "train", 1)[0])))
    (tmp_path / "d.jsonl").write_text(json.dumps({**record, **change}) + "\n")
    with pytest.raises(DialogueError, match=reason):
        load_dialogues(tmp_path / "d.jsonl")


def test_a_line_that_is_not_json_is_rejected_with_its_number(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n{not json\n")
    with pytest.raises(DialogueError, match=r"d.jsonl:2: not valid JSON"):
        load_dialogues(tmp_path / "d.jsonl")


def test_prompts_follow_lesson_4s_dialogue_format():
    assert prompt_for([("<audio> describe this sound.", "a red circle")], "now draw it.") == (
        "question: <audio> describe this sound. answer: a red circle. question: now draw it. answer:")
    assert prompt_for([], "<image> draw it.") == "question: <image> draw it. answer:"


@pytest.fixture(scope="module")
def stage2(tokenizer, decoders):
    """A tiny stage-2 model over copies of the session's decoders (with a few stage-2 steps)."""
    return build_signal_llm(base_model(tokenizer), {m: copy.deepcopy(d) for m, d in decoders.items()},
                            Stage2Config(**TINY_STAGE2))


@pytest.fixture(scope="module")
def tuned(stage2):
    """(untouched stage-2 copy, LoRA-tuned model, history, LLM weights before tuning)."""
    before = copy.deepcopy(stage2)
    merge_signal_rows(before)  # a plain LLM, as the zoo's stage 2 is
    model = prepare_stage3(copy.deepcopy(stage2), Stage3Config(**TINY_STAGE3))
    weights = {n: p.detach().clone() for n, p in before.base.llm.named_parameters()}
    history = train_stage3(model, Stage3Config(**TINY_STAGE3), World(seed=0), templates=IMAGE_TEMPLATES)
    return before, model, history, weights


def test_lora_trains_the_adapters_signal_rows_and_projections_and_nothing_else(tuned):
    before, model, _, weights = tuned
    llm = model.base.llm
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    config, rows = llm.get_base_model().config, sum(len(ids) for ids in model.signals.values())
    per_layer = 4 * 4 * (config.hidden_size + config.hidden_size)  # q, k, v, o: r (in + out) each, r=4
    assert trainable_parameters(model)["llm trainable"] == config.num_hidden_layers * per_layer + 2 * rows * config.hidden_size
    merged = copy.deepcopy(llm).merge_and_unload()
    base = {n: p for n, p in llm.get_base_model().named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
    first_signal = min(i for ids in model.signals.values() for i in ids)
    plain = dict(merged.named_parameters())
    for name, value in weights.items():  # the frozen weights under the adapters did not move
        if "embed_tokens" in name or "lm_head" in name:  # old rows unchanged, after merging the new ones in
            assert torch.equal(plain[name][:first_signal], value[:first_signal]), name
        else:
            key = name.replace(".weight", ".base_layer.weight")
            assert torch.equal(base[key if key in base else name], value), name
    assert any(not torch.equal(p, weights[n]) for n, p in merged.named_parameters() if n in weights)
    assert trainable_parameters(model)["projections trainable"] > 0


def test_stage3_lowers_the_answer_loss_and_logs_every_term(tuned):
    _, _, history, _ = tuned
    assert "answer" in history.loss and any(name.endswith("alignment") for name in history.loss)
    world = World(seed=0)
    _, model, _, _ = tuned
    before = tuned[0]
    dialogues = make_dialogues(world, "train", 8, IMAGE_TEMPLATES, start=5000)
    with torch.no_grad():
        losses = [stage3_losses(m, *training_examples(m, world, dialogues), terms=("answer",))["answer"].item()
                  for m in (before, model)]
    assert losses[1] < losses[0]


def test_replay_is_stage_1s_caption_loss_and_its_shares_add_up_to_the_batch(tuned):
    _, model, history, _ = tuned
    assert len(history.loss["replay"]) == TINY_STAGE3["steps"]
    world = World(seed=0)
    with torch.no_grad():
        whole = replay_loss(model, world, step=3, size=6)
        halves = [replay_loss(model, world, 3, 6, share) for share in (slice(0, 3), slice(3, 6))]
        # computed as stage 1 computes its loss, on the same scenes and modalities
        prompts, inputs, answers, _ = caption_batch(model.base, world, model.base.modalities,
                                                     world.scenes(world.split("train", 6, start=18)), 3)
        direct = model.base.answer_loss(model.base.prepare(prompts, inputs, answers)).mean()
    assert torch.allclose(whole, direct, atol=1e-6)
    assert not torch.allclose(halves[0], halves[1])  # each share holds its own rows of the batch
    assert torch.allclose(whole, sum(halves) / 2, atol=1e-5)


def test_merge_and_unload_gives_the_same_outputs_as_the_adapters(tuned):
    _, model, _, _ = tuned
    world = World(seed=0)
    prompts, inputs, answers, _ = training_examples(model, world, make_dialogues(world, "test", 4, IMAGE_TEMPLATES))
    with torch.no_grad():
        _, out = model.read(prompts, inputs, answers)
        merged = copy.deepcopy(model)
        merged.base.llm = merged.base.llm.merge_and_unload()
        _, plain = merged.read(prompts, inputs, answers)
    assert type(merged.base.llm).__name__ == "LlamaForCausalLM"
    assert torch.allclose(out.logits, plain.logits, atol=1e-4)
    assert torch.allclose(out.hidden_states[-1], plain.hidden_states[-1], atol=1e-4)


def test_adapters_save_as_safetensors_and_load_to_the_same_outputs(tuned, tmp_path):
    before, model, history, _ = tuned
    save_stage3(model, history, Stage3Config(**TINY_STAGE3), tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    loaded, _ = load_stage3(tmp_path, copy.deepcopy(before))
    assert trainable_parameters(loaded) == trainable_parameters(model)  # what stage 3 trained, counted again
    world = World(seed=0)
    prompts, inputs, answers, _ = training_examples(model, world, make_dialogues(world, "test", 4, IMAGE_TEMPLATES))
    with torch.no_grad():
        assert torch.allclose(model.read(prompts, inputs, answers)[1].logits,
                              loaded.read(prompts, inputs, answers)[1].logits, atol=1e-5)
        assert torch.allclose(model.project("image", prompts[:2], inputs=inputs[:2]),
                              loaded.project("image", prompts[:2], inputs=inputs[:2]), atol=1e-5)


def test_run_dialogues_grades_every_turn_of_every_dialogue(tuned):
    _, model, _, _ = tuned
    world = World(seed=0)
    dialogues = make_dialogues(world, "train", 6, ["describe-picture", "see-then-draw"])
    records = run_dialogues(model, world, dialogues, max_new_tokens=4)
    assert [len(r["turns"]) for r in records] == [len(d.turns) for d in dialogues]
    for record in records:
        assert record["success"] == all(t["text_ok"] and t["output_ok"] for t in record["turns"])
        for turn in record["turns"]:
            if turn["asked"] != turn["wanted"]:
                assert not turn["text_ok"]


def test_unknown_tuning_and_an_empty_run_are_refused(stage2):
    with pytest.raises(ValueError, match="lora.*full.*frozen"):
        prepare_stage3(copy.deepcopy(stage2), Stage3Config(tuning="qlora"))
    frozen = prepare_stage3(copy.deepcopy(stage2), Stage3Config(tuning="frozen", projections=False))
    with pytest.raises(ValueError, match="nothing to train"):
        train_stage3(frozen, Stage3Config(tuning="frozen", projections=False), World(seed=0), IMAGE_TEMPLATES)


def test_full_scale_lora_is_nextgpts_size_on_the_meta_device():
    from transformers import LlamaForCausalLM

    llm_config = course_config.scale_config("llm", LLMConfig, "full")
    stage3 = course_config.scale_config("stage3", Stage3Config, "full")
    assert (stage3.lora.r, stage3.lora.alpha, stage3.lora.dropout) == (32, 32, 0.1)
    with torch.device("meta"):
        llm = LlamaForCausalLM(llama_config(None, llm_config))
        lora = add_lora(llm, stage3.lora)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == 32 * 4 * 32 * (4096 + 4096) == 33_554_432  # NExT-GPT: about 33.5M


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux's /proc only")
def test_peak_memory_measures_what_training_allocates_after_a_reset():
    from mmlib.instruction import peak_resident_gib, reset_peak

    reset_peak()
    before = peak_resident_gib()
    block = torch.ones(64, 2**20)  # 256 MiB, touched
    during = peak_resident_gib()
    del block
    reset_peak()
    assert during - before > 0.2 and peak_resident_gib() < during


# -- the lesson loops train on the GPU where there is one ------------------------------------------


def record_training_device(monkeypatch) -> list[tuple]:
    """Record the modules each loop hands to `on_training_device` (which still moves them as usual)."""
    seen, real = [], course_config.on_training_device

    @contextlib.contextmanager
    def recording(*modules):
        seen.append(modules)
        with real(*modules) as device:
            yield device

    monkeypatch.setattr(course_config, "on_training_device", recording)
    return seen


def decoder_parts(model) -> set[int]:
    return {id(m) for d in model.decoders.values() for m in (d.pipeline.unet, d.pipeline.vae, d.pipeline.text_encoder)}


def test_stage_loops_move_the_model_and_the_decoders_modules_to_the_training_device(monkeypatch, stage2):
    seen = record_training_device(monkeypatch)
    base = copy.deepcopy(stage2.base)
    train_stage1(base, Stage1Config(modalities=("image",), steps=1, batch_size=2), World(seed=0))
    assert [tuple(map(id, modules)) for modules in seen] == [(id(base),)]
    for stage in (2, 3):
        seen.clear()
        model = copy.deepcopy(stage2)
        if stage == 2:
            train_stage2(model, Stage2Config(**{**TINY_STAGE2, "steps": 1}), World(seed=0))
        else:
            config = Stage3Config(**{**TINY_STAGE3, "steps": 1, "terms": ("answer", "alignment", "generation")})
            train_stage3(prepare_stage3(model, config), config, World(seed=0), templates=IMAGE_TEMPLATES)
        assert len(seen) == 1 and seen[0][0] is model, stage
        assert decoder_parts(model) <= set(map(id, seen[0][1:])), f"stage {stage} leaves a decoder module behind"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (checked on the device machine)")
def test_stage_loops_train_on_the_gpu_and_hand_back_cpu_models(monkeypatch, stage2):
    monkeypatch.delenv("MMLIB_DEVICE", raising=False)
    base = copy.deepcopy(stage2.base)
    history = train_stage1(base, Stage1Config(modalities=("image",), steps=2, batch_size=4), World(seed=0))
    assert all(np.isfinite(v).all() for v in history.loss.values())
    model = copy.deepcopy(stage2)
    histories = [train_stage2(model, Stage2Config(**TINY_STAGE2), World(seed=0))]
    config = Stage3Config(**{**TINY_STAGE3, "terms": ("answer", "alignment", "generation", "replay")})
    model = prepare_stage3(model, config)
    histories.append(train_stage3(model, config, World(seed=0), templates=IMAGE_TEMPLATES))
    assert all(np.isfinite(v).all() for h in histories for v in h.loss.values())
    for module in (base, model, *model.decoder_modules()):
        assert {p.device.type for p in module.parameters()} == {"cpu"}


def test_alignment_fills_what_the_inputs_never_revealed_with_fixed_values():
    world = World(seed=0)
    film_imu, = make_dialogues(world, "train", 1, ["film-imu"])  # an IMU reading reveals motion and temperature
    turn = film_imu.turns[0]
    assert set(turn.expect) == {"motion", "temperature"}
    filled = alignment_values(turn, fill_unknown=True)
    assert (filled["motion"], filled["temperature"]) == (turn.values["motion"], turn.values["temperature"])
    assert {a: filled[a] for a in ("shape", "color", "size", "position")} == \
        {a: UNKNOWN_FILL[a] for a in ("shape", "color", "size", "position")}
    assert alignment_values(turn) == turn.values  # the default: the scene's own values (the projector learns their average)
    draw, = make_dialogues(world, "train", 1, ["draw-caption"])
    assert {a: v for a, v in alignment_values(draw.turns[0], True).items() if a in draw.turns[0].expect} == \
        draw.turns[0].expect


def test_stage3_scores_an_outputs_first_signal_token_and_not_the_ones_put_in_after_it(stage2):
    world = World(seed=0)
    dialogues = make_dialogues(world, "train", 4, ["draw-caption"])  # one turn each, answered "[image]"
    counts = {}
    loss = stage3_losses(stage2, *training_examples(stage2, world, dialogues), terms=("answer",), counts=counts)["answer"]
    assert counts["answer"] == len(dialogues)  # one choice of output per turn
    prompts, inputs, answers, _ = training_examples(stage2, world, dialogues)
    with torch.no_grad():
        batch, out = stage2.read(prompts, inputs, answers)
    first = stage2.signals["image"][0]
    rows, cols = torch.nonzero(batch["labels"] == first, as_tuple=True)  # where [IMG0] is the label
    expected = torch.nn.functional.cross_entropy(out.logits[rows, cols - 1].float(), batch["labels"][rows, cols])
    assert torch.isclose(loss, expected, atol=1e-5)


def test_stage3_aligns_to_the_filled_caption_only_with_fill_unknown(stage2):
    world = World(seed=0)
    dialogues = make_dialogues(world, "train", 6, ["draw-caption"])
    assert any(len(d.turns[0].expect) < 6 for d in dialogues)  # some captions leave attributes out
    prompts, inputs, answers, turns = training_examples(stage2, world, dialogues)
    plain = stage3_losses(stage2, prompts, inputs, answers, turns, ("alignment",))["image alignment"]
    again = stage3_losses(stage2, prompts, inputs, answers, turns, ("alignment",))["image alignment"]
    filled = stage3_losses(stage2, prompts, inputs, answers, turns, ("alignment",), fill_unknown=True)["image alignment"]
    assert torch.equal(plain, again) and not torch.isclose(plain, filled)
