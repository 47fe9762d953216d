"""mmlib.regimes: lesson 7's experiment. Regime (a) builds the zoo's model at random and trains every
part on the six terms at once; link_report probes each link; broken() puts a fault in one part."""

import json

import pytest
import torch

from mmlib import zoo
from mmlib.data import World
from mmlib.decoders import OUTPUTS, decoders_to_link
from mmlib.encoders import count_parameters
from mmlib.output_projection import load_stage2
from mmlib.regimes import (LINKS, TERMS, AllAtOnceConfig, broken, build_untrained, link_report, load_all_at_once,
                           overall_losses, save_all_at_once, train_all_at_once)

SMALL = AllAtOnceConfig(steps=2, encoder_batch=8, llm_batch=4, denoising_batch={"image": 2, "audio": 2, "video": 1},
                        caption_batch=6, request_batch=2, dialogue_batch=2)


@pytest.fixture(scope="module")
def world():
    return World()


@pytest.fixture(scope="module")
def trained(world):
    """Regime (a) after two small steps: (parts, history)."""
    return train_all_at_once(SMALL, world)


def test_regime_a_is_the_zoo_model_with_every_weight_random(world):
    parts = build_untrained(world)
    zoo_model = load_stage2(zoo.ensure("stage2"), decoders=decoders_to_link(OUTPUTS, unets=False))[0]
    for name, ours, theirs in [("encoders", parts.model.base.encoders, zoo_model.base.encoders),
                               ("LLM", parts.model.base.llm, zoo_model.base.llm),
                               ("input projection", parts.model.base.projection, zoo_model.base.projection),
                               ("output projectors", parts.model.projectors, zoo_model.projectors)]:
        assert count_parameters(ours) == count_parameters(theirs), name  # the same parameter count, part by part
    assert parts.model.signals == zoo_model.signals
    image = torch.from_numpy(world.image(world.scenes(world.split("test", 4))))
    assert not torch.allclose(parts.model.base.encoders.embed("image", image), zoo_model.base.encoders.embed("image", image))
    # every part trains, decoders included (a SignalLLM freezes its decoders; regime (a) must not)
    assert all(p.requires_grad for p in parts.parameters())
    unets = {m: parts.model.decoders[m].pipeline.unet for m in OUTPUTS}
    assert type(unets["video"]).__name__ == "UNet3DConditionModel" and len({id(u) for u in unets.values()}) == 3


def test_one_step_of_L_overall_reaches_every_part_and_is_seeded(world):
    first = build_untrained(world)
    losses = overall_losses(first, world, 0, SMALL, torch.Generator().manual_seed(0))
    assert list(losses) == list(TERMS) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model = first.model
    parts = {**{f"{m} tower": t for m, t in model.base.encoders.towers.items()}, "LLM": model.base.llm,
             "input projection": model.base.projection, **{f"{m} projector": p for m, p in model.projectors.items()},
             **{f"{m} UNet": model.decoders[m].pipeline.unet for m in OUTPUTS},
             **{f"{m} VAE": model.decoders[m].pipeline.vae for m in ("image", "audio")}}
    for name, module in parts.items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), f"no gradient reaches {name}"
    again = overall_losses(build_untrained(world), world, 0, SMALL, torch.Generator().manual_seed(0))
    assert all(torch.equal(losses[t].detach(), again[t].detach()) for t in TERMS)  # same seed, same numbers


def test_training_records_each_term_and_round_trips_through_safetensors(trained, world, tmp_path):
    parts, history = trained
    assert set(history.loss) == set(TERMS) and all(len(v) == SMALL.steps for v in history.loss.values())
    save_all_at_once(parts, history, SMALL, tmp_path)
    loaded, again = load_all_at_once(tmp_path)
    assert again.loss == history.loss
    for model in (parts.model, loaded):  # sampling is repeatable: the video UNet's dropout is off
        assert not any(d.pipeline.unet.training or d.pipeline.vae.training for d in model.decoders.values())
    scenes = world.scenes(world.split("test", 3))
    for modality in ("image", "imu"):
        x = torch.from_numpy(world.render(modality, scenes))
        assert torch.equal(loaded.base.encoders.embed(modality, x), parts.model.base.encoders.embed(modality, x))
    assert loaded.decoders["audio"].pipeline.vae.config.scaling_factor == parts.model.decoders["audio"].pipeline.vae.config.scaling_factor
    record = json.loads((tmp_path / "all_at_once.json").read_text())
    assert record["config"]["steps"] == SMALL.steps
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "all_at_once.safetensors")
    state.pop(next(k for k in state if k.startswith("video.unet.")))
    save_file(state, tmp_path / "all_at_once.safetensors")
    with pytest.raises(ValueError, match="holds another model"):
        load_all_at_once(tmp_path)


def test_link_report_measures_every_link_and_a_fault_shows_in_its_own_links(trained, world):
    judge = zoo.load("judge")
    model = trained[0].model
    for decoder in model.decoders.values():
        decoder.config.inference_steps = 2  # the test's own model: a fast sampler is enough to run every probe
    report = link_report(model, judge, world, scenes=4, dialogues=2)
    assert list(report) == list(LINKS) and all(0.0 <= v <= 1.0 for v in report.values())
    some = link_report(model, judge, world, scenes=4, dialogues=2, links=("captioning", "retrieval"))
    assert some == {"retrieval": report["retrieval"], "captioning": report["captioning"]}  # only those, the same figures
    with pytest.raises(ValueError, match="unknown link 'speech'"):
        link_report(model, judge, world, scenes=4, links="speech")
    weights = {k: v.clone() for k, v in model.base.projection.state_dict().items()}
    image = torch.from_numpy(world.image(world.scenes(world.split("test", 4))))
    embedding = model.base.encoders.embed("image", image)
    with broken(model, "input projection"):
        changed = model.base.projection.state_dict()
        assert all(not torch.equal(changed[k], weights[k]) for k in weights)
        assert torch.equal(model.base.encoders.embed("image", image), embedding)  # the encoders are untouched
        again = link_report(model, judge, world, scenes=4, dialogues=2)
        assert again["retrieval"] == report["retrieval"] and again["decoding"] == report["decoding"]  # not on the path
    assert all(torch.equal(model.base.projection.state_dict()[k], v) for k, v in weights.items())  # put back
    with pytest.raises(ValueError, match="part"):
        with broken(model, "vocoder"):
            pass
