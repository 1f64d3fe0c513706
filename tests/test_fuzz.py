"""Fuzzing the config surface: every bad value fails before training with a message naming the
key; nothing is trained and no checkpoint is written."""

import random

import pytest
from hydra.errors import HydraException

from clrun.cli import _check_override_keys
from clrun.config import RULES, ConfigError

BAD_VALUES = ["abc", "-1", "0", "nan", "inf", "-inf", "1.5", "[]", "[1,x]", "true", "null", "1e400"]
# keys whose rule accepts some of the values above (null, true, 1.5, ...) are checked value by value
CASES = [(key, value) for key in RULES for value in BAD_VALUES]

EXPLICIT = [
    # (overrides, text the message must contain)
    (["benchmark.class_order=[]"], "benchmark.class_order"),
    (["benchmark.class_order=[0,0,1,2,3,4,5,6,7,8]"], "benchmark.class_order"),
    (["benchmark.class_order=[0,1,2,3,4,5,6,7,8,10]"], "benchmark.class_order"),
    (["benchmark.n_experiences=11"], "benchmark.n_experiences"),
    (["benchmark.n_experiences=0"], "benchmark.n_experiences"),
    (["strategy=lwf", "strategy.temperature=nan"], "strategy.temperature"),
    (["strategy=lwf", "strategy.alpha=inf"], "strategy.alpha"),
    (["strategy=ewc", "strategy.mode=offline"], "strategy.mode"),
    (["strategy=ewc", "strategy.ewc_lambda=-5"], "strategy.ewc_lambda"),
    (["strategy=ewc", "strategy.decay_factor=2"], "strategy.decay_factor"),
    (["strategy=replay", "buffer=none"], "buffer"),
    (["strategy=replay", "buffer=class_balanced", "buffer.groupby=colour"], "buffer.groupby"),
    (["device=tpu"], "device"),
    (["resume=true"], "resume"),
]


def accepted(key: str, value: str) -> bool:
    """Whether the rule for ``key`` accepts ``value`` as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"k={value}"])[0].value()
    check, _ = RULES[key]
    try:
        return bool(check(parsed))
    except Exception:
        return False


def expect_config_error(run_debug, tmp_path, overrides: list[str], text: str) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises((ConfigError, HydraException, ValueError)) as e:
        run_debug(*overrides, run_dir=run_dir)
    assert text in str(e.value), (overrides, str(e.value))
    assert "\n" not in str(e.value).strip(), "one line"
    assert not (run_dir / "checkpoint").exists(), "training started"


@pytest.mark.parametrize("key,value", random.Random(0).sample(CASES, 60))
def test_random_bad_values_name_the_key(run_debug, tmp_path, key, value):
    if accepted(key, value):
        pytest.skip(f"{key}={value} is valid")
    needs = {"optimizer.momentum": ["optimizer=sgd"], "logger.wandb.mode": ["logger=wandb"]}
    needs = needs.get(key, [])
    expect_config_error(run_debug, tmp_path, [*needs, f"{key}={value}"], key)


@pytest.mark.parametrize("overrides,text", EXPLICIT, ids=lambda v: str(v))
def test_known_bad_configs(run_debug, tmp_path, overrides, text):
    expect_config_error(run_debug, tmp_path, overrides, text)


@pytest.mark.parametrize(
    "override",
    ["strategy.epochz=2", "optimizer.lrate=0.1", "benchmark.scenaro=task", "model.head.x=1"],
)
def test_unknown_keys_name_the_key_and_the_allowed_ones(override):
    message = _check_override_keys(["debug=default", override])
    assert message is not None and override.split("=")[0] in message, message
    assert "allowed" in message or "no keys" in message, message


def test_valid_overrides_pass_the_key_check():
    assert _check_override_keys(["strategy=lwf", "strategy.alpha=2", "-m", "seed=0,1"]) is None
    assert _check_override_keys(["+strategy.components.x._target_=a.B"]) is None
