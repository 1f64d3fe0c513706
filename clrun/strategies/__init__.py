"""Strategy components: the building blocks that ``conf/strategy/*.yaml`` compose.

Each component is one short file; see :mod:`clrun.components` for the hooks and when they run.
"""

from clrun.strategies.cumulative import Cumulative, Joint
from clrun.strategies.ewc import EWC
from clrun.strategies.lwf import LwF
from clrun.strategies.replay import Replay

__all__ = ["EWC", "Cumulative", "Joint", "LwF", "Replay"]
