"""The ``clrun`` command: Hydra composes the config, :func:`clrun.run.run` runs it.

The task function returns the final average accuracy so that Hydra sweepers (Optuna) can
optimise it. User errors (a bad value, a mistyped key) exit with status 2 and one line on stderr;
the run directory still gets a ``summary.json`` saying ``failed`` and why.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

GROUPS = ("benchmark", "model", "strategy", "buffer", "optimizer")
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 3


def config_dir() -> Path:
    """The packaged configs (installed wheel) or the repository's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from clrun.config import ConfigError
    from clrun.preemption import RunInterrupted
    from clrun.run import run

    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    try:
        summary = run(cfg, hc.runtime.output_dir, choices)
    except ConfigError as e:
        print(f"clrun: error: {e}", file=sys.stderr)
        if hc.mode == RunMode.RUN:
            sys.exit(EXIT_CONFIG_ERROR)
        raise
    except RunInterrupted as e:
        print(f"clrun: {e}; checkpoint saved, continue with the same command", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    return summary["final_avg_acc"]


def main() -> None:
    """Console entry point (``clrun`` and ``python -m clrun``)."""
    message = _check_override_keys(sys.argv[1:])
    if message:
        print(f"clrun: error: {message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    _main()


def _check_override_keys(argv: list[str]) -> str | None:
    """Hydra rejects an override of a key that does not exist, but without saying which keys
    do. Compose once (sweeps at their first value) and, if a key is unknown, name the keys that
    exist at that level and the closest match. Anything else is left to Hydra's own messages."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(argv)
        if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
            return None
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, Exception):  # let Hydra report malformed command lines itself
        return None
    probe, keys = [], []
    for o in overrides:
        if o.key_or_group.startswith("hydra"):
            continue
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
        probe.append(
            f"{o.input_line.split('=', 1)[0]}={value}" if value is not None else o.input_line
        )
        if "." in o.key_or_group and o.type.name == "CHANGE":
            keys.append((o.key_or_group, o.input_line.split("=", 1)[1]))
    if not keys:
        return None
    if args.config_dir:
        probe.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    name = args.config_name or "config"
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            try:
                compose(name, overrides=probe)
                return None
            except HydraException:
                bare = [p for p in probe if "." not in p.split("=", 1)[0] or p.startswith("hydra.")]
                cfg = compose(name, overrides=bare)
    except Exception:  # noqa: BLE001 - a problem Hydra will report in its own words
        return None
    for key, value in keys:
        if OmegaConf.select(cfg, key, default="\0missing") != "\0missing":
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig):
            return f"{key}={value}: '{parent_key}' has no keys (it is {parent!r})"
        allowed = sorted(str(k) for k in parent)
        close = difflib.get_close_matches(leaf, allowed, n=1)
        hint = f" Did you mean {parent_key}.{close[0]}?" if close else ""
        return (
            f"{key}={value}: unknown key '{leaf}' in {parent_key}; "
            f"allowed: {', '.join(allowed)}.{hint} (To add a new key use +{key}=...)"
        )
    return None
