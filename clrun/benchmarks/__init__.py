"""Benchmarks (being split into modules; see the next commit)."""

from clrun.benchmarks.core import *  # noqa: F403
