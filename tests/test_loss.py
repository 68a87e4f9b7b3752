"""The EOV-Seg set criterion (eovseg/loss_eovseg.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from eovseg import EovSegConfig
from eovseg.configuration_eovseg import EovSegInputError
from eovseg.loss_eovseg import EovSegLoss


def make_config(**overrides):
    return EovSegConfig.from_variant("tiny", **overrides)


def random_case(seed, batch=2, queries=6, classes=4, low=(8, 12), stages=3, counts=(2, 3)):
    """Random stage logits at 1/4 resolution and block-structured binary targets at full resolution."""
    g = torch.Generator().manual_seed(seed)
    h, w = low
    class_logits = [torch.randn(batch, queries, classes + 1, generator=g) * 3 for _ in range(stages)]
    mask_logits = [torch.randn(batch, queries, h, w, generator=g) * 4 for _ in range(stages)]
    mask_labels, class_labels = [], []
    for n in counts:
        ids = torch.randint(0, n + 1, (h, w), generator=g)
        ids = ids.repeat_interleave(4, 0).repeat_interleave(4, 1)
        mask_labels.append(torch.stack([(ids == j).float() for j in range(n)]) if n else torch.zeros(0, 4 * h, 4 * w))
        class_labels.append(torch.randint(0, classes, (n,), generator=g))
    return class_logits, mask_logits, mask_labels, class_labels


# ----------------------------------------------------------------------------------------------------------------------
# A case small enough to compute by hand
# ----------------------------------------------------------------------------------------------------------------------


def _pixel_centres(height, width):
    ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (h * w, 2) as (x, y)


def test_loss_matches_hand_computation(monkeypatch):
    # Two queries, one target, 2x2 predicted masks, an 8x8 target made of 4x4 blocks. Mask points are the four
    # pixel centres of the prediction grid: there the prediction is read exactly and the target (bilinear between
    # pixels 4j+1 and 4j+2 of a constant block) too.
    monkeypatch.setattr(
        EovSegLoss,
        "sample_points_using_uncertainty",
        lambda self, logits, *args: _pixel_centres(2, 2).expand(logits.shape[0], -1, -1).clone(),
    )
    config = make_config(train_num_points=64)
    criterion = EovSegLoss(config)

    q0_mask = [[3.0, 2.0], [-1.0, -4.0]]  # agrees with the target: it is matched whatever the matching points
    q1_mask = [[-3.0, -2.0], [1.0, 4.0]]
    class_logits = torch.tensor([[[4.0, 0.5, -1.0], [0.0, 1.0, 3.0]]])  # K = 2 classes + void
    mask_logits = torch.tensor([[q0_mask, q1_mask]])
    target_low = [[1.0, 1.0], [0.0, 0.0]]
    target = torch.tensor(target_low).repeat_interleave(4, 0).repeat_interleave(4, 1)[None]
    loss, loss_dict = criterion([class_logits], [mask_logits], [target], [torch.tensor([0])])

    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    # Cross-entropy: query 0 -> class 0 (weight 1), query 1 -> void (weight 0.1); weighted mean.
    rows = class_logits[0].tolist()
    ce = -(1.0 * log_softmax(rows[0], 0) + 0.1 * log_softmax(rows[1], 2)) / (1.0 + 0.1)
    # BCE over the 4 points, dice with +1 smoothing; one target mask.
    xs = [v for row in q0_mask for v in row]
    ts = [v for row in target_low for v in row]
    sig = [1 / (1 + math.exp(-x)) for x in xs]
    bce = sum(-(t * math.log(s) + (1 - t) * math.log(1 - s)) for s, t in zip(sig, ts)) / 4
    dice = 1 - (2 * sum(s * t for s, t in zip(sig, ts)) + 1) / (sum(sig) + sum(ts) + 1)

    assert set(loss_dict) == {"s0_loss_ce", "s0_loss_mask", "s0_loss_dice"}
    assert loss_dict["s0_loss_ce"].item() == pytest.approx(ce, rel=1e-6)
    assert loss_dict["s0_loss_mask"].item() == pytest.approx(bce, rel=1e-6)
    assert loss_dict["s0_loss_dice"].item() == pytest.approx(dice, rel=1e-6)
    assert loss.item() == pytest.approx(2.0 * ce + 5.0 * bce + 5.0 * dice, rel=1e-6)

    # Two stages: terms named per stage and summed in the total.
    loss2, loss_dict2 = criterion([class_logits] * 2, [mask_logits] * 2, [target], [torch.tensor([0])])
    assert set(loss_dict2) == {f"s{s}_{k}" for s in (0, 1) for k in ("loss_ce", "loss_mask", "loss_dice")}
    assert loss2.item() == pytest.approx(2 * loss.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Equality with a plain re-statement of the original criterion
# ----------------------------------------------------------------------------------------------------------------------


def _bilinear(maps, points):
    """maps (N, H, W), points (N, P, 2) in [0, 1] (x, y) -> (N, P), zero outside, align_corners=False."""
    grid = (2.0 * points - 1.0).unsqueeze(2)
    return F.grid_sample(maps.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0, :, 0]


def reference_criterion(class_logits_per_stage, mask_logits_per_stage, mask_labels, class_labels, cfg):
    """EOV-Seg's criterion written out from its definition, with the random draws in the original's order: per stage,
    per image the matching points `rand(1, P, 2)`, then for all matched pairs `rand(M, 3P, 2)` candidates and
    `rand(M, P - int(0.75 P), 2)` extra random points."""
    P = cfg.train_num_points
    total = 0.0
    terms = {}
    num_masks = max(sum(len(c) for c in class_labels), 1)
    for stage, (cls, msk) in enumerate(zip(class_logits_per_stage, mask_logits_per_stage)):
        matches = []
        with torch.no_grad():
            for b in range(cls.shape[0]):
                probs = cls[b].softmax(-1)
                points = torch.rand(1, P, 2)
                q, n = msk.shape[1], mask_labels[b].shape[0]
                pred = _bilinear(msk[b], points.expand(q, -1, -1))  # (Q, P)
                tgt = _bilinear(mask_labels[b], points.expand(n, -1, -1))  # (N, P)
                # mean over points of BCE(pred_q, tgt_n), and dice(sigmoid(pred_q), tgt_n)
                log_p, log_not_p = F.logsigmoid(pred), F.logsigmoid(-pred)
                bce = -(log_p @ tgt.T + log_not_p @ (1 - tgt).T) / P
                s = pred.sigmoid()
                dice = 1 - (2 * s @ tgt.T + 1) / (s.sum(1)[:, None] + tgt.sum(1)[None, :] + 1)
                cost = cfg.mask_weight * bce + cfg.class_weight * (-probs[:, class_labels[b]]) + cfg.dice_weight * dice
                rows, cols = linear_sum_assignment(cost.numpy())
                matches.append((rows, cols))
        # classification
        void = cls.shape[-1] - 1
        weights = torch.ones(void + 1)
        weights[-1] = cfg.no_object_weight
        num, den = 0.0, 0.0
        for b in range(cls.shape[0]):
            target = torch.full((cls.shape[1],), void)
            rows, cols = matches[b]
            target[torch.as_tensor(rows, dtype=torch.long)] = class_labels[b][torch.as_tensor(cols, dtype=torch.long)]
            log_probs = cls[b].log_softmax(-1)
            for qi in range(cls.shape[1]):
                num = num - weights[target[qi]] * log_probs[qi, target[qi]]
                den = den + weights[target[qi]]
        ce = num / den
        # masks, pairs in (image, prediction) order
        preds = torch.cat([msk[b][torch.as_tensor(matches[b][0], dtype=torch.long)] for b in range(cls.shape[0])])
        tgts = torch.cat(
            [mask_labels[b][torch.as_tensor(matches[b][1], dtype=torch.long)] for b in range(cls.shape[0])]
        )
        m = preds.shape[0]
        with torch.no_grad():
            candidates = torch.rand(m, int(P * cfg.oversample_ratio), 2)
            uncertainty = -_bilinear(preds.detach(), candidates).abs()
            k = int(cfg.importance_sample_ratio * P)
            top = uncertainty.topk(k, dim=1).indices
            points = torch.stack([candidates[i, top[i]] for i in range(m)]) if m else torch.zeros(0, k, 2)
            points = torch.cat([points, torch.rand(m, P - k, 2)], dim=1)
            labels = _bilinear(tgts, points)
        logits = _bilinear(preds, points)
        bce = (-(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits))).mean(1).sum() / num_masks
        s = logits.sigmoid()
        dice = (1 - (2 * (s * labels).sum(1) + 1) / (s.sum(1) + labels.sum(1) + 1)).sum() / num_masks
        terms.update({f"s{stage}_loss_ce": ce, f"s{stage}_loss_mask": bce, f"s{stage}_loss_dice": dice})
        total = total + cfg.class_weight * ce + cfg.mask_weight * bce + cfg.dice_weight * dice
    return total, terms


@pytest.mark.parametrize(
    "seed, counts, queries",
    [(0, (2, 3), 6), (1, (0, 4), 6), (2, (5, 1), 4), (3, (3, 0), 8)],  # (5, 1) with 4 queries: unmatched targets
)
def test_loss_equals_reference_restatement(seed, counts, queries):
    cfg = make_config(train_num_points=200)
    cls, msk, masks, labels = random_case(seed, queries=queries, counts=counts)
    cls = [c.requires_grad_() for c in cls]
    msk = [m.requires_grad_() for m in msk]
    torch.manual_seed(100 + seed)
    loss, terms = EovSegLoss(cfg)(cls, msk, masks, labels)
    grads = torch.autograd.grad(loss, cls + msk)
    torch.manual_seed(100 + seed)
    ref_loss, ref_terms = reference_criterion(cls, msk, masks, labels, cfg)
    ref_grads = torch.autograd.grad(ref_loss, cls + msk)
    assert set(terms) == set(ref_terms)
    for key in terms:
        assert terms[key].detach().item() == pytest.approx(float(ref_terms[key].detach()), rel=1e-5, abs=1e-6), key
    assert loss.detach().item() == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_criterion_is_mask2formers_with_what_differs_overridden():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    assert issubclass(EovSegLoss, Mask2FormerLoss)
    # matching, point sampling and uncertainty are transformers' own
    for name in ("sample_points_using_uncertainty", "calculate_uncertainty", "_get_predictions_permutation_indices"):
        assert name not in vars(EovSegLoss), name
    criterion = EovSegLoss(make_config(class_weight=3.0, mask_weight=4.0, dice_weight=6.0, train_num_points=77))
    assert type(criterion.matcher).__name__ == "Mask2FormerHungarianMatcher"
    assert (criterion.matcher.cost_class, criterion.matcher.cost_mask, criterion.matcher.cost_dice) == (3.0, 4.0, 6.0)
    assert criterion.matcher.num_points == 77 == criterion.num_points


# ----------------------------------------------------------------------------------------------------------------------
# Gradients, empty targets, state, errors
# ----------------------------------------------------------------------------------------------------------------------


def test_gradients_flow_to_every_stage():
    cfg = make_config()
    cls, msk, masks, labels = random_case(0)
    cls = [c.requires_grad_() for c in cls]
    msk = [m.requires_grad_() for m in msk]
    loss, terms = EovSegLoss(cfg)(cls, msk, masks, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for t in cls + msk:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert len(terms) == 9 and all(v.dim() == 0 for v in terms.values())


def test_no_targets_at_all():
    cfg = make_config()
    cls, msk, masks, labels = random_case(0, counts=(0, 0))
    cls = [c.requires_grad_() for c in cls]
    msk = [m.requires_grad_() for m in msk]
    loss, terms = EovSegLoss(cfg)(cls, msk, masks, labels)
    assert torch.isfinite(loss)
    assert all(terms[f"s{s}_loss_mask"].item() == 0 and terms[f"s{s}_loss_dice"].item() == 0 for s in range(3))
    # every query is pushed towards void
    expected_ce = F.cross_entropy(cls[0].transpose(1, 2), torch.full((2, 6), 4)).item()
    assert terms["s0_loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    loss.backward()
    assert msk[0].grad is not None and msk[0].grad.abs().sum() == 0


def test_criterion_holds_no_state_and_leaves_checkpoints_unchanged():
    from eovseg import EovSegForPanopticSegmentation

    criterion = EovSegLoss(make_config())
    assert list(criterion.parameters()) == [] and list(criterion.buffers()) == []
    assert criterion.state_dict() == {}
    config = make_config(num_stages=1)
    model = EovSegForPanopticSegmentation(config).train()
    assert isinstance(model.criterion, EovSegLoss)
    keys = set(model.state_dict())
    assert not any(key.startswith("criterion") for key in keys)
    cls, msk, masks, labels = random_case(0, queries=config.num_proposals, stages=1)
    model.compute_loss(cls, msk, masks, labels)
    assert set(model.state_dict()) == keys


def test_num_masks_normalisation_and_weights():
    cfg = make_config(class_weight=0.0, dice_weight=0.0, mask_weight=1.0, train_num_points=50)
    cls, msk, masks, labels = random_case(4, counts=(2, 2), stages=1)
    torch.manual_seed(0)
    loss, terms = EovSegLoss(cfg)(cls, msk, masks, labels)
    assert loss.item() == pytest.approx(terms["s0_loss_mask"].item())
    criterion = EovSegLoss(cfg)
    assert criterion.get_num_masks(labels, torch.device("cpu")) == 4.0
    assert criterion.get_num_masks([torch.zeros(0)], torch.device("cpu")) == 1.0


def test_num_masks_is_averaged_across_processes(monkeypatch):
    # A 2-process run simulated in-process: this rank has 3 masks, the other one 1.
    def all_reduce(tensor):
        tensor.add_(1.0)

    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    criterion = EovSegLoss(make_config())
    assert criterion.get_num_masks([torch.zeros(2), torch.zeros(1)], torch.device("cpu")) == 2.0
    assert criterion.get_num_masks([torch.zeros(0)], torch.device("cpu")) == 1.0  # (0 + 1) / 2 clamped to 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, m, ml, cl: (c, m, ml, [cl[0], torch.tensor([0, 1, 9])]), "outside the vocabulary"),
        (lambda c, m, ml, cl: (c, m, ml[:1], cl[:1]), "one per image"),
        (lambda c, m, ml, cl: (c, m, ml, [cl[0], cl[1][:1]]), "same N"),
        (lambda c, m, ml, cl: (c, m, [ml[0][:, :16], ml[1][:, :16]], cl), "aspect ratio"),
        (lambda c, m, ml, cl: (c, m[:2], ml, cl), "stages"),
    ],
)
def test_input_errors(mutate, message):
    args = mutate(*random_case(0))
    with pytest.raises(EovSegInputError, match=message):
        EovSegLoss(make_config())(*args)
