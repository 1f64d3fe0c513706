"""Every ``clrun`` command the README shows composes and passes the config checks as written."""

import re
import shlex

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from clrun.config import validate


def readme_commands() -> list[list[str]]:
    """``clrun ...`` lines of the README's code blocks (joined continuation lines; shell prompts,
    comments and chained commands removed)."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for line in (ln.strip() for b in blocks for ln in b.splitlines()):
        line = line.removeprefix("$ ")
        if line.startswith("clrun ") and not line.startswith("clrun: "):
            line = line.split(" && ")[0]
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def first_of_sweeps(args: list[str]) -> list[str]:
    """A multirun's first job: ``key=a,b,c`` → ``key=a`` (outside brackets and braces)."""
    out = []
    for a in args:
        key, _, value = a.partition("=")
        depth, cut = 0, len(value)
        for i, ch in enumerate(value):
            depth += ch in "[{("
            depth -= ch in "]})"
            if ch == "," and depth == 0:
                cut = i
                break
        out.append(f"{key}={value[:cut]}" if _ else a)
    return out


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) > 30 and any("unlearning.requests" in " ".join(c) for c in COMMANDS)


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_readme_command_composes(args):
    if args[0].startswith("--") or any(f in args for f in ("--help", "--cfg", "--info")):
        return  # Hydra's own flags: tested in test_cli
    args = first_of_sweeps([a for a in args if a not in ("-m", "--multirun")])
    if any("interval(" in a or "choice(" in a for a in args):
        args = [a for a in args if "interval(" not in a and "choice(" not in a]  # Optuna's space
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=args, return_hydra_config=True)
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
