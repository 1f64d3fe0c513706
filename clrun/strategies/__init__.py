"""Strategy components: the building blocks that ``conf/strategy/*.yaml`` compose.

Each component is one short file; see :mod:`clrun.components` for the hooks and when they run.
What several of them share (quadratic penalties, per-sample and flat gradients, features of raw
samples, the old part of grown tensors) is public in :mod:`clrun.strategies.utils`, for your own
components too.
"""

from clrun.strategies.agem import AGEM
from clrun.strategies.amnesiac import Amnesiac
from clrun.strategies.aper import APER
from clrun.strategies.cumulative import Cumulative, Joint
from clrun.strategies.der import DER
from clrun.strategies.ease import EASE
from clrun.strategies.er_ace import ERACE
from clrun.strategies.ewc import EWC
from clrun.strategies.fecam import FeCAM
from clrun.strategies.freezing import FreezeBackbone, TrainOnly
from clrun.strategies.gdumb import GDumb
from clrun.strategies.gem import GEM
from clrun.strategies.icarl import ICaRL
from clrun.strategies.lucir import LUCIR
from clrun.strategies.lwf import LwF
from clrun.strategies.mas import MAS
from clrun.strategies.podnet import PODNet
from clrun.strategies.ranpac import RanPAC
from clrun.strategies.replay import Replay
from clrun.strategies.rwalk import RWalk
from clrun.strategies.si import SI
from clrun.strategies.simplecil import SimpleCIL
from clrun.strategies.slca import SLCA
from clrun.strategies.xder import XDER

__all__ = [
    "AGEM",
    "APER",
    "DER",
    "EASE",
    "ERACE",
    "EWC",
    "GEM",
    "LUCIR",
    "MAS",
    "PODNet",
    "SI",
    "SLCA",
    "XDER",
    "Amnesiac",
    "Cumulative",
    "FeCAM",
    "FreezeBackbone",
    "GDumb",
    "ICaRL",
    "Joint",
    "LwF",
    "RWalk",
    "RanPAC",
    "Replay",
    "SimpleCIL",
    "TrainOnly",
]
