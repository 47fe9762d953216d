import math

import pytest
import torch
import torch.nn.functional as F

from mmlib.contrastive import MAX_LOGIT_SCALE, ContrastiveConfig, LogitScale, contrastive_loss, train_contrastive


def reference_loss(a, b, scale):
    """CLIP's pseudo-code, written independently: cross-entropy over both directions."""
    logits_per_a = torch.einsum("id,jd->ij", a, b) * scale
    labels = torch.arange(len(a))
    return 0.5 * (F.cross_entropy(logits_per_a, labels) + F.cross_entropy(logits_per_a.t(), labels))


@pytest.mark.parametrize("batch, dim, temperature", [(8, 4, 0.07), (33, 16, 0.5), (2, 3, 1.0)])
def test_loss_and_gradient_match_reference(batch, dim, temperature):
    torch.manual_seed(batch)
    raw_a, raw_b = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / temperature), requires_grad=True)
    mine = contrastive_loss(F.normalize(raw_a, dim=1), F.normalize(raw_b, dim=1), log_scale.exp())
    grads = torch.autograd.grad(mine, [raw_a, raw_b, log_scale])
    theirs = reference_loss(F.normalize(raw_a, dim=1), F.normalize(raw_b, dim=1), log_scale.exp())
    reference_grads = torch.autograd.grad(theirs, [raw_a, raw_b, log_scale])
    assert torch.allclose(mine, theirs, atol=1e-6)
    for got, want in zip(grads, reference_grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_perfect_pairs_give_low_loss_and_shuffled_pairs_high():
    a = F.normalize(torch.eye(16), dim=1)
    assert contrastive_loss(a, a, torch.tensor(100.0)) < 1e-3
    assert contrastive_loss(a, a.roll(1, dims=0), torch.tensor(100.0)) > 50
    assert torch.isclose(contrastive_loss(a, a, torch.tensor(0.0)), torch.tensor(math.log(16)))


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"got \(4, 3\) and \(5, 3\)"):
        contrastive_loss(torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0))


def test_logit_scale_starts_at_clip_value_and_is_capped():
    scale = LogitScale()
    assert math.isclose(scale.log_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert math.isclose(scale.temperature, 0.07, rel_tol=1e-5)
    scale.log_scale.data.fill_(10.0)  # exp(10) = 22026
    assert scale().item() == MAX_LOGIT_SCALE
    scale().backward()
    assert scale.log_scale.grad.item() == 0.0  # past the cap, nothing pushes it further
    assert not LogitScale(learnable=False).log_scale.requires_grad


def align_two_views(learn_temperature: bool):
    torch.manual_seed(0)
    truth = torch.randn(4096, 8)
    view_a, view_b = truth @ torch.randn(8, 8), truth @ torch.randn(8, 8)  # two linear views of one thing
    encode_a, encode_b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    third = torch.nn.Linear(8, 8)  # a second pair shares view b, with its own temperature
    config = ContrastiveConfig(steps=150, batch_size=64, lr=1e-2)
    scales = {"a-b": LogitScale(learnable=learn_temperature), "c-b": LogitScale(0.5, learnable=learn_temperature)}

    def losses(step):
        a, b = view_a[step * 16 % 4000 :][:64], view_b[step * 16 % 4000 :][:64]
        target = F.normalize(encode_b(b), dim=1)
        return {"a-b": contrastive_loss(F.normalize(encode_a(a), dim=1), target, scales["a-b"]()),
                "c-b": contrastive_loss(F.normalize(third(a), dim=1), target, scales["c-b"]())}

    return train_contrastive(
        losses, parameter_groups=[{"params": [*encode_a.parameters(), *encode_b.parameters(), *third.parameters()]}],
        config=config, logit_scales=scales, evaluate=lambda: {"ok": 1.0}, eval_every=50,
    )


def test_training_loop_aligns_two_views():
    history = align_two_views(learn_temperature=True)
    assert history.steps == 150 and set(history.loss) == {"a-b", "c-b"}
    assert history.loss["a-b"][-1] < 0.1 * history.loss["a-b"][0]
    assert history.loss["c-b"][-1] < 0.5 * history.loss["c-b"][0]  # a warm start sets a higher floor
    assert history.temperature["a-b"][-1] != pytest.approx(0.07, abs=1e-4)  # it moved
    assert history.temperature["c-b"][0] == pytest.approx(0.5, rel=1e-3)  # each pair has its own
    assert history.temperature["c-b"][-1] < 0.4  # and learns it
    assert [e["step"] for e in history.evaluations] == [50, 100, 150]
    fixed = align_two_views(learn_temperature=False)
    assert {round(t, 6) for t in fixed.temperature["a-b"]} == {0.07}
