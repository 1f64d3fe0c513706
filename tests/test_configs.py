"""Every option of every config group composes, and every YAML key is documented."""

import pytest
import torch
import yaml
from conftest import (
    CONF,
    GROUPS,
    TIMM_TINY,
    assert_learned,
    has_torchvision,
    make_cfg,
    options,
)

from clrun.config import ConfigError, build, build_model, validate

# Presets whose benchmark keys the synthetic benchmark lacks: with debug=default they stop with a
# one-line ConfigError naming the key. strict: the test fails once synthetic accepts the key.
# Presets that pin a key of their own benchmark (GEM's 1000-sample subsets of permuted MNIST):
# with debug's synthetic benchmark they stop with a one-line config error naming that key.
SYNTHETIC_LACKS = {
    f"chaudhry2019/{m}": "train_samples_per_experience"
    for m in ("agem", "ewc", "mas", "rwalk", "van")
} | {  # the 50-class first experience of the PODNet and LUCIR CIFAR-100 protocols
    p: "first_experience_classes"
    for p in (
        "douillard2020/cifar_b50_5steps_podnet",
        "douillard2020/cifar_b50_10steps_podnet",
        "hou2019/cifar_b50_5steps_lucir",
        "hou2019/cifar_b50_10steps_lucir",
    )
}


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_validates(group, option):
    cfg = make_cfg(f"{group}={option}")
    validate(cfg)


def _debug_cases():
    for group in GROUPS:
        for option in options(group):
            marks = []
            if group == "experiment" and option in SYNTHETIC_LACKS:
                reason = f"synthetic has no benchmark.{SYNTHETIC_LACKS[option]}"
                marks = [pytest.mark.xfail(raises=ConfigError, strict=True, reason=reason)]
            yield pytest.param(group, option, marks=marks, id=f"{group}={option}")


@pytest.mark.parametrize("group,option", _debug_cases())
def test_every_option_composes_with_debug(group, option):
    """debug=default sets only keys every option of a group has, and wins over a preset: each
    option validates with it and, on the synthetic benchmark, builds its benchmark and model."""
    cfg = make_cfg("debug=default", f"{group}={option}")
    assert cfg.threads == 1 and cfg.strategy.epochs == 2, "debug must win over the option"
    validate(cfg)
    if group == "experiment" and cfg.model.get("_target_") == "clrun.models.timm_model":
        return  # a ViT-B/16 preset: building it needs its published weights (tested apart)
    if group == "benchmark" and option != "synthetic":
        return  # real data: test_debug_runs_on_every_benchmark_with_data (slow)
    if group == "model" and option == "torchvision" and not has_torchvision():
        return  # test_debug_runs_every_model says what happens without it
    if group == "model" and option == "timm":
        pytest.importorskip("timm")
        cfg = make_cfg("debug=default", *TIMM_TINY)
    benchmark = build(cfg.benchmark, "benchmark")
    model = build_model(cfg, benchmark, torch.device("cpu")).eval()
    exp = benchmark.train_stream[0]
    x = benchmark.prepare(exp.x[:4], exp.e[:4])
    spec = model.input_spec  # a pre-trained backbone's own input, else the benchmark's
    assert x.shape[1:] == (benchmark.input_shape if spec is None else (3, *spec.size))
    if cfg.model.head == "single":  # other heads grow at the first experience
        with torch.no_grad():
            assert model(x).shape == (4, benchmark.n_classes)  # small inputs pass through


SLOW_MODELS = ("resnet18", "mobilenet_v1", "torchvision")  # 5-30 s each: the slow suite
MODELS = [pytest.param(m, marks=[pytest.mark.slow] * (m in SLOW_MODELS)) for m in options("model")]
# The small CNN (no batch norm, global average pooling of 2×2 maps) cannot overturn the old
# classes' logits in 26 class-incremental steps on the 8×8 synthetic images (R[i][i] stays at
# 0.5); it learns every experience task-incrementally, which is what this test checks for it.
EXTRA = {"cnn": ["benchmark.scenario=task", "model.head=multi"], "timm": TIMM_TINY[1:]}


@pytest.mark.parametrize("model", MODELS)
def test_debug_runs_every_model_and_it_learns(run_debug, model):
    """clrun debug=default model=M runs end to end and learns each experience it trains on.
    resnet18 and mobilenet_v1 take a minute on one CPU thread: slow."""
    if model == "timm":
        pytest.importorskip("timm")
    if model == "torchvision" and not has_torchvision():
        with pytest.raises(ConfigError, match=r"needs torchvision.*pip install"):
            run_debug(f"model={model}")
        return
    summary, run_dir = run_debug(f"model={model}", *EXTRA.get(model, []))
    assert summary["status"] == "completed" and summary["model"] == model
    assert_learned(run_dir)


def test_every_group_has_options():
    for group in ("benchmark", "model", "strategy", "buffer", "optimizer", "debug"):
        assert options(group), group


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_starts_with_a_comment_and_every_key_is_commented(path):
    text = path.read_text()
    yaml.safe_load(text)
    assert text.lstrip().startswith("#"), f"{path} needs a header comment (what it is, the command)"
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or path.name == "config.yaml":
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and not value.strip().startswith("|") and "_target_" not in key:
            assert "#" in value or "${" in value, f"{path.name}: '{stripped}' has no comment"


def test_a_strategy_key_no_component_reads_is_a_config_error():
    """A key added to a strategy (by a preset or a user's YAML) that nothing reads would be
    silently ignored: validation names it and the keys the strategy has."""
    with pytest.raises(ConfigError, match=r"strategy.ewc_lamda=5: no component .* ewc_lambda"):
        validate(make_cfg("strategy=ewc", "+strategy.ewc_lamda=5"))
    validate(make_cfg("strategy=ewc", "strategy.ewc_lambda=5"))
