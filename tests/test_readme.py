"""Every command the README and the documents it links to show still runs as shown: ``clrun``
commands compose and pass the config checks; ``scripts/reproduce.py`` commands name existing
presets and options; ``scripts/bench.py`` commands use options the script has."""

import importlib.util
import re
import shlex
import sys

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from clrun.config import validate

# the README and the documents moved out of it: the results records and the performance record
DOCUMENTS = [
    ROOT / "README.md",
    CONF / "benchmark" / "README.md",
    CONF / "strategy" / "README.md",
    CONF / "experiment" / "README.md",
    *sorted((CONF / "experiment").glob("*/README.md")),
    ROOT / "scripts" / "README.md",
]


def shown_commands(program: str) -> list[list[str]]:
    """``<program> ...`` lines of the documents' bash blocks, as arguments (joined continuation
    lines; shell prompts, comments and chained commands removed)."""
    commands = []
    for doc in DOCUMENTS:
        text = doc.read_text().replace("\\\n", " ")
        blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        for line in (ln.strip() for b in blocks for ln in b.splitlines()):
            line = line.removeprefix("$ ")
            if line.startswith(program + " "):
                line = line.split(" && ")[0]
                commands.append(shlex.split(line, comments=True)[len(program.split()) :])
    return commands


def readme_commands() -> list[list[str]]:
    """The ``clrun ...`` commands the documents show."""
    return shown_commands("clrun")


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
    assert len(COMMANDS) > 20 and any("unlearning.requests" in " ".join(c) for c in COMMANDS)
    readme, index = (
        (ROOT / "README.md").read_text(),
        (CONF / "experiment" / "README.md").read_text(),
    )
    for doc in DOCUMENTS[1:]:  # every moved document exists and is linked from the README ...
        if doc.parent.parent == CONF / "experiment":  # ... or, a paper's record, from the index
            assert f"]: {doc.parent.name}/README.md" in index, doc
        else:
            assert doc.relative_to(ROOT).as_posix() in readme, doc


def test_every_results_record_shows_its_presets_command():
    shown = {a for c in COMMANDS for a in c if a.startswith("experiment=")}
    for record in (CONF / "experiment").glob("*/README.md"):
        assert f"experiment={record.parent.name}/" in " ".join(shown), record


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


REPRODUCE = shown_commands("python scripts/reproduce.py")
BENCH = shown_commands("python scripts/bench.py")


def test_the_documents_show_script_commands():
    assert len(REPRODUCE) >= 10 and BENCH


@pytest.mark.parametrize("args", REPRODUCE, ids=[" ".join(c) for c in REPRODUCE])
def test_reproduce_command_names_existing_presets(args, monkeypatch, tmp_path):
    reproduce = _script("reproduce")
    ran = {}
    monkeypatch.setattr(reproduce, "check_records", lambda: ran.setdefault("check", []))
    monkeypatch.setattr(reproduce, "run_one", lambda *a: ran.setdefault("runs", []).append(a))
    monkeypatch.setattr(reproduce, "table", lambda *a: "")
    monkeypatch.setattr(reproduce, "quick_overrides", lambda p: [])
    reproduce.main([*args, "--out", str(tmp_path)])  # parses, checks the presets, runs nothing
    assert ran, "the command ran nothing"


@pytest.mark.parametrize("args", BENCH, ids=[" ".join(c) for c in BENCH])
def test_bench_command_uses_existing_options(args):
    source = (ROOT / "scripts" / "bench.py").read_text()
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
        assert f'"{flag}"' in source, f"scripts/bench.py has no option {flag}"


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
