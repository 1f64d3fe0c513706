"""clrun: a continual-learning experiment runner. ``clrun --help`` lists the config groups.

From Python: ``clrun.compose(overrides)`` → config, ``clrun.run(cfg, run_dir=None)`` → summary,
``clrun.load_run(run_dir)`` → config, summary, accuracy matrices and the trained model (see
:mod:`clrun.api`). Importing clrun imports neither torch nor Hydra; ``clrun.run`` does (torch).
"""

from clrun.api import LoadedRun, compose, load_run

__version__ = "0.1.0"

__all__ = ["LoadedRun", "__version__", "compose", "load_run", "run"]


def __getattr__(name: str):
    # `clrun.run`: the module clrun/run.py, which is callable (clrun.api.CallableModule). Loaded
    # on first use: it imports torch.
    if name == "run":
        import importlib

        return importlib.import_module("clrun.run")
    raise AttributeError(f"module 'clrun' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "run"})
