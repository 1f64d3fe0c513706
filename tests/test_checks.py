"""Value checks (clrun.checks) at their edges, and the public helpers of clrun.strategies.utils
against hand computations on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clrun import checks
from clrun.checks import (
    Rule,
    boolean,
    int_at_least,
    number_above,
    number_at_least,
    number_in,
    one_of,
    optional,
    probability,
    probability_below_one,
    require,
)
from clrun.config import RULES, ConfigError
from clrun.models import MASKED
from clrun.strategies import GDumb, utils

NAN, INF = float("nan"), float("inf")

# rule, values it must accept, values it must reject (just outside, wrong type, non-finite)
CASES = [
    (int_at_least(1), [1, 2, 10**12], [0, -1, 1.0, True, "1", None]),
    (int_at_least(0), [0, 7], [-1, False, 0.0, None]),
    (number_above(0), [1e-300, 1, 2.5], [0, 0.0, -1e-300, NAN, INF, True, "1", None]),
    (number_at_least(0), [0, 0.0, 3, 1e300], [-1e-12, -1, NAN, -INF, INF, False, None]),
    (probability(), [0, 0.0, 0.5, 1, 1.0], [-1e-9, 1 + 1e-9, NAN, True, False, None]),
    (probability_below_one(), [0, 0.999999], [1, 1.0, -0.1, NAN, None]),
    (number_in(0, 1, open_lo=True), [1e-9, 1], [0, 0.0, 1.1, NAN]),
    (one_of(("old", "seen")), ["old", "seen"], ["all", "Old", None, 0]),
    (boolean(), [True, False], [0, 1, "true", None]),
    (optional(int_at_least(1)), [None, 1], [0, True, 1.5]),
]


@pytest.mark.parametrize(
    "rule,good,bad", CASES, ids=lambda v: v.allowed if isinstance(v, Rule) else ""
)
def test_each_rule_accepts_its_edges_and_rejects_just_outside(rule, good, bad):
    for v in good:
        assert rule.check(v), (rule.allowed, v)
        assert require("k", v, rule) is v
    for v in bad:
        assert not rule.check(v), (rule.allowed, v)
        with pytest.raises(ValueError, match=r"^k="):
            require("k", v, rule)


def test_allowed_texts_say_what_is_allowed():
    assert int_at_least(1).allowed == "an integer ≥ 1"
    assert number_above(0).allowed == "a finite number > 0"
    assert number_at_least(0).allowed == "a finite number ≥ 0"
    assert probability().allowed == "a number in [0, 1]"
    assert probability_below_one().allowed == "a number in [0, 1)"
    assert number_in(0, 1, open_lo=True).allowed == "a number in (0, 1]"
    assert one_of(("fp32", "bf16")).allowed == "one of fp32 | bf16"
    assert boolean().allowed == "true or false"
    assert optional(int_at_least(1)).allowed == "null or an integer ≥ 1"
    assert optional(int_at_least(1), "null (= all)").allowed == "null (= all) or an integer ≥ 1"


def test_require_names_key_value_and_what_is_allowed():
    with pytest.raises(ValueError) as e:
        require("strategy.xi", 0, number_above(0))
    assert str(e.value) == "strategy.xi=0 is not allowed: expected a finite number > 0"
    with pytest.raises(ConfigError, match=r"^unlearning\.disable='yes' is not allowed"):
        require("unlearning.disable", "yes", boolean(), ConfigError)
    assert checks.not_allowed("a", [1], "x") == "a=[1] is not allowed: expected x"


def test_config_rules_are_checks_rules():
    check, allowed = RULES["optimizer.momentum"]  # unpacks as (check, allowed)
    assert allowed == "a number in [0, 1)" and check(0.9) and not check(1.0)
    assert not RULES["seed"].check(True) and RULES["seed"].check(0)
    assert not RULES["optimizer.lr"].check(NAN) and RULES["optimizer.lr"].check(1e-9)
    assert RULES["threads"].check(None) and not RULES["threads"].check(0)


def test_a_strategy_constructor_uses_the_same_message():
    with pytest.raises(
        ValueError, match=r"^GDumb memory_size=0 is not allowed: expected an integer ≥ 1$"
    ):
        GDumb(memory_size=0)
    with pytest.raises(ValueError, match=r"clip_grad_norm=nan is not allowed: expected null"):
        GDumb(clip_grad_norm=NAN)
    assert GDumb(memory_size=1, clip_grad_norm=None).clip_grad_norm is None


# --------------------------------------------------------------------------- strategies.utils


def test_utils_exposes_the_shared_helpers():
    from clrun.models import old_part

    for name in (
        "old_part",
        "anchor_of",
        "quadratic",
        "add_quadratic_grad",
        "flat_grad",
        "write_grad",
        "sum_per_sample_grads",
        "piece",
        "model_input",
        "backbone_features",
        "buffer_features",
        "offer",
        "frozen_copy",
        "nearest_mean_logits",
        "strong_augment",
    ):
        assert name in utils.__all__ and callable(getattr(utils, name)), name
    assert utils.old_part is old_part
    # the old import paths of helpers that moved keep working
    from clrun.strategies.gem import flat_grad
    from clrun.strategies.icarl import nearest_mean_logits
    from clrun.strategies.replay import backbone_features, model_input

    assert flat_grad is utils.flat_grad and nearest_mean_logits is utils.nearest_mean_logits
    assert backbone_features is utils.backbone_features and model_input is utils.model_input


def _tiny() -> nn.Linear:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model.bias.copy_(torch.tensor([0.5, -0.5]))
    return model


def test_quadratic_matches_a_hand_computation_on_the_old_part_of_grown_parameters():
    model = _tiny()
    anchor = {"weight": torch.tensor([[0.0, 2.0]]), "bias": torch.tensor([1.0])}
    weights = {"weight": torch.tensor([[2.0, 5.0]]), "bias": torch.tensor([3.0])}
    # only the first output unit existed when the anchor was taken (the head grew since)
    # weight: 2·(1−0)² + 5·(2−2)² = 2; bias: 3·(0.5−1)² = 0.75
    value = utils.quadratic(model, weights, anchor)
    assert value.dtype == torch.float32 and value.item() == pytest.approx(2.75)
    value.backward()
    assert model.weight.grad.tolist() == [[4.0, 0.0], [0.0, 0.0]]  # 2·w·(θ−θ*), old part only
    assert model.bias.grad.tolist() == [-3.0, 0.0]
    assert utils.anchor_of(model)["weight"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_add_quadratic_grad_adds_the_penalty_gradient_to_what_backward_left():
    model = _tiny()
    anchor = {"weight": torch.tensor([[0.0, 2.0]])}
    weights = {"weight": torch.tensor([[2.0, 5.0]])}
    model.weight.grad = torch.ones(2, 2)
    utils.add_quadratic_grad(model.named_parameters(), weights, anchor, coef=2 * 0.5)
    # 1 + 2λ·w·(θ − θ*) with λ = 0.5 on the old part; bias has no weight: no gradient made
    assert model.weight.grad.tolist() == [[3.0, 1.0], [1.0, 1.0]]
    assert model.bias.grad is None
    fresh = _tiny()
    utils.add_quadratic_grad(fresh.named_parameters(), weights, anchor, coef=1.0)
    assert fresh.weight.grad.tolist() == [[2.0, 0.0], [0.0, 0.0]]  # starts from zero


def test_flat_grad_and_write_grad_round_trip():
    a, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(3, requires_grad=True)
    flat = utils.flat_grad([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None], [a, b])
    assert flat.tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]
    utils.write_grad(torch.arange(7.0), [a, b], [True, False])
    assert a.grad.tolist() == [[0.0, 1.0], [2.0, 3.0]] and b.grad is None
    utils.write_grad(-torch.arange(7.0), [a, b], [True, True])
    assert a.grad.tolist() == [[0.0, -1.0], [-2.0, -3.0]] and b.grad.tolist() == [-4, -5, -6]


def test_frozen_copy_and_nearest_mean_logits():
    model = _tiny()
    other = {k: v * 0 for k, v in model.state_dict().items()}
    teacher = utils.frozen_copy(model, other)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.weight.abs().sum() == 0 and model.weight.abs().sum() == 10  # a copy
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = utils.nearest_mean_logits(
        torch.tensor([[2.0, 0.0]]), means, torch.tensor([True, False])
    )
    assert logits[0, 0].item() == pytest.approx(0.0)  # the same direction: distance 0
    assert logits[0, 1].item() == MASKED  # no mean
