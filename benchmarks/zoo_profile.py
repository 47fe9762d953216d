"""Where the zoo's training time goes: per entry, steps, seconds and their split, and the figure it reaches.

    python benchmarks/zoo_profile.py [ENTRY ...] [--seed N] [--threads N] [--cache DIR]

Trains the named entries (default: all) and everything they need into an empty cache (a temporary
folder unless --cache names one), one after another in this process, as `make test`'s zoo does, and
prints one row per entry: optimizer steps, seconds, and the share of those seconds spent

- rendering data (the world's renderers and captions, text corpora, dialogues, latents encoded once),
- in forward passes (any module's forward outside the other categories),
- in backward and optimizer steps,
- evaluating during training (samples a decoder draws while it trains),
- other (Python between those: batching, tokenizing, bookkeeping);

and then the figure each entry reaches, measured after training on fresh test scenes.
Time is given to the outermost category: a forward pass inside an evaluation counts as evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager



class Clock:
    """Wall-clock seconds per category; nested categories count for the outermost one."""

    def __init__(self) -> None:
        self.seconds, self.active, self.started = defaultdict(float), None, 0.0

    def enter(self, category: str) -> bool:
        if self.active is not None:
            return False
        self.active, self.started = category, time.perf_counter()
        return True

    def leave(self) -> None:
        self.seconds[self.active] += time.perf_counter() - self.started
        self.active = None

    @contextmanager
    def timing(self, category: str):
        mine = self.enter(category)
        try:
            yield
        finally:
            if mine:
                self.leave()

    def wrap(self, owner, name: str, category: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            with self.timing(category):
                return function(*args, **kwargs)

        setattr(owner, name, timed)


def instrument(clock: Clock) -> None:
    """Route the course's data, forward, backward, optimizer and sampling calls through `clock`."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import mmlib.decoders
    import mmlib.instruction
    import mmlib.llm
    from mmlib.data import World

    for method in ("scenes", "render", "image", "depth", "thermal", "video", "audio", "imu", "log_mel", "captions"):
        clock.wrap(World, method, "render")
    clock.wrap(mmlib.llm, "text_corpus", "render")
    clock.wrap(mmlib.instruction, "make_dialogues", "render")
    clock.wrap(mmlib.decoders, "training_latents", "render")
    clock.wrap(mmlib.decoders.Decoder, "__call__", "evaluate")
    clock.wrap(torch.Tensor, "backward", "backward")

    depth = {"forward": 0, "mine": False}

    def before(module, args):
        if depth["forward"] == 0:
            depth["mine"] = clock.enter("forward")
        depth["forward"] += 1

    def after(module, args, output):
        depth["forward"] -= 1
        if depth["forward"] == 0 and depth["mine"]:
            clock.leave()

    torch.nn.modules.module.register_module_forward_pre_hook(before)
    torch.nn.modules.module.register_module_forward_hook(after)
    optimizer = {"mine": False}

    def step_before(*_):
        optimizer["mine"] = clock.enter("backward")

    def step_after(*_):
        if optimizer["mine"]:
            clock.leave()

    register_optimizer_step_pre_hook(step_before)
    register_optimizer_step_post_hook(step_after)
    steps = defaultdict(int)
    register_optimizer_step_post_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1))
    clock.steps = steps


# -- the figure each entry reaches ---------------------------------------------------------------

TEST = 200  # test scenes per figure


def figure(name: str) -> str:
    """One line: the quality entry `name` reaches, graded as its lesson grades it."""
    import torch

    from mmlib import zoo
    from mmlib.data import REVEALS, World

    world = World()
    scenes = world.scenes(world.split("test", TEST))
    if name in ("clip", "clap", "imagebind"):
        from mmlib.imagebind import zero_shot_table

        modalities = {"clip": ("image",), "clap": ("audio",), "imagebind": ("audio", "video", "depth", "thermal", "imu")}[name]
        table = zero_shot_table(zoo.load(name).encoders, world, scenes, modalities)
        worst = min((value, m, a) for m, row in table.items() for a, value in row.items())
        return f"zero-shot attribute accuracy, worst {worst[0]:.3f} ({worst[1]} {worst[2]})"
    if name == "judge":
        judge = zoo.load("judge")
        rows = {m: judge.grade(m, torch.from_numpy(world.render(m, scenes)), scenes.attributes)
                for m in ("image", "audio", "video")}
        worst = min((v, m, a) for m, row in rows.items() for a, v in row.items())
        return f"reads rendered data, worst {worst[0]:.3f} ({worst[1]} {worst[2]})"
    if name.endswith("-vae"):
        from mmlib.autoencoder import decode, encode, psnr, render_for_vae

        vae, modality = zoo.load(name), name.removesuffix("-vae")
        x = render_for_vae(world, modality, scenes)
        return f"reconstruction PSNR {psnr(x, decode(vae, encode(vae, x)), peak=2.0):.1f} dB ([-1, 1] range)"
    if name.endswith("-decoder"):
        from mmlib.decoders import eval_prompts, grade

        modality = name.removesuffix("-decoder")
        prompts, scenes = eval_prompts(modality, world, TEST)
        accuracy, _ = grade(zoo.load(name), zoo.load("judge"), prompts, scenes, seed=0)
        worst = min(accuracy, key=accuracy.get)
        return f"judge on samples of test captions, worst {accuracy[worst]:.3f} ({worst})"
    if name == "llm":
        from mmlib.input_projection import INPUTS, attribute_accuracy
        from mmlib.llm import PROMPT, complete, describe_request

        llm, worst = zoo.load("llm"), (2.0, "")
        for modality in INPUTS:
            contexts = world.captions(scenes, variant=7, mention="all", among=REVEALS[modality])[0]
            answers = complete(llm.model, llm.tokenizer,
                               [PROMPT.format(context=c, request=describe_request(modality)) for c in contexts])
            worst = min(worst, *[(v, f"{modality} {a}") for a, v in attribute_accuracy(answers, scenes, REVEALS[modality]).items()])
        return f"copies attributes from text, worst {worst[0]:.3f} ({worst[1]})"
    if name == "stage1":
        from mmlib.input_projection import INPUTS, caption_accuracy

        model, _ = zoo.load("stage1")
        worst = min((v, f"{m} {a}") for m in INPUTS for a, v in caption_accuracy(model, world, scenes, m)[0].items())
        return f"caption attribute accuracy, worst {worst[0]:.3f} ({worst[1]})"
    if name.startswith("stage3"):
        from mmlib.instruction import make_dialogues, run_dialogues, success_rate

        records = run_dialogues(zoo.load(name)[0], world, make_dialogues(world, "test", 120), zoo.load("judge"))
        return f"held-out dialogue success {success_rate(records):.3f} (120 dialogues)"
    if name == "tokenizer":
        return f"{len(zoo.load('tokenizer'))} tokens"
    return "(no figure: graded in its lesson)"


HEADER = f"{'entry':<14}{'steps':>7}{'seconds':>9}{'render':>8}{'forward':>9}{'bwd+opt':>9}{'eval':>7}{'other':>7}  figure"


def row_line(row: dict) -> str:
    shares = "".join(f"{row[k]:>{w}.0%}" for k, w in (("render", 8), ("forward", 9), ("backward", 9), ("evaluate", 7),
                                                      ("other", 7)))
    return f"{row['entry']:<14}{row['steps']:>7}{row['seconds']:>9.1f}{shares}  {row.get('figure', '')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("entries", nargs="*", help="zoo entries (default: all); what they need trains first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for what is not training (training always runs on one)")
    parser.add_argument("--cache", help="zoo cache to train into (default: a new temporary folder)")
    parser.add_argument("--no-figures", action="store_true", help="skip measuring each entry's figure")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    os.environ.update(MMLIB_SEED=str(args.seed), MMLIB_SCALE="tiny", MMLIB_PROGRESS="0",
                      MMLIB_CACHE=args.cache or tempfile.mkdtemp(prefix="zoo-profile-"))
    import torch

    from mmlib import zoo

    torch.set_num_threads(args.threads)
    clock = Clock()
    instrument(clock)
    order = zoo.plan(args.entries or zoo.names())
    print(f"seed {args.seed}, {torch.get_num_threads()} thread(s), cache {os.environ['MMLIB_CACHE']}", flush=True)
    print(HEADER, flush=True)
    rows = []
    for name in order:
        clock.seconds.clear()
        clock.steps["n"] = 0
        start = time.perf_counter()
        zoo.ensure(name, progress=False)
        total = time.perf_counter() - start
        shares = {k: clock.seconds[k] / total for k in ("render", "forward", "backward", "evaluate")}
        shares["other"] = 1 - sum(shares.values())
        rows.append({"entry": name, "steps": clock.steps["n"], "seconds": total, **shares})
        print(row_line(rows[-1]), flush=True)
    if not args.no_figures:
        for row in rows:
            row["figure"] = figure(row["entry"])
    print()
    print(HEADER)
    print("-" * len(HEADER))
    for row in rows:
        print(row_line(row))
    print(f"{'total':<14}{sum(r['steps'] for r in rows):>7}{sum(r['seconds'] for r in rows):>9.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
