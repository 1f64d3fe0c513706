"""Every option of every config group composes, and every YAML key is documented."""

import pytest
import yaml
from conftest import CONF, GROUPS, make_cfg, options

from clrun.config import validate


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in options(g)], ids=lambda v: str(v)
)
def test_every_option_composes_and_validates(group, option):
    cfg = make_cfg(f"{group}={option}")
    validate(cfg)


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
