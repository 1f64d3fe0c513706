"""Models (being split into modules; see the next commit)."""

from clrun.models.backbones import *  # noqa: F403
