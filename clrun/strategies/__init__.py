"""Strategy components: the building blocks that ``conf/strategy/*.yaml`` compose.

Each component is one short file; see :mod:`clrun.components` for the hooks and when they run.
"""

from clrun.strategies.agem import AGEM
from clrun.strategies.cumulative import Cumulative, Joint
from clrun.strategies.ewc import EWC
from clrun.strategies.gem import GEM
from clrun.strategies.lwf import LwF
from clrun.strategies.mas import MAS
from clrun.strategies.replay import Replay
from clrun.strategies.rwalk import RWalk
from clrun.strategies.si import SI

__all__ = [
    "AGEM",
    "EWC",
    "GEM",
    "MAS",
    "SI",
    "Cumulative",
    "Joint",
    "LwF",
    "RWalk",
    "Replay",
]
