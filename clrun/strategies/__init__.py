"""Strategy components: the building blocks that ``conf/strategy/*.yaml`` compose.

Each component is one short file; see :mod:`clrun.components` for the hooks and when they run.
What several of them share (quadratic penalties, per-sample and flat gradients, features of raw
samples, the old part of grown tensors) is public in :mod:`clrun.strategies.utils`, for your own
components too.
"""

from clrun.strategies.agem import AGEM
from clrun.strategies.amnesiac import Amnesiac
from clrun.strategies.aper import APER
from clrun.strategies.bic import BiC
from clrun.strategies.coda_prompt import CODAPrompt
from clrun.strategies.cumulative import Cumulative, Joint
from clrun.strategies.der import DER
from clrun.strategies.dualprompt import DualPrompt
from clrun.strategies.dynamic_der import DynamicDER
from clrun.strategies.ease import EASE
from clrun.strategies.er_ace import ERACE
from clrun.strategies.ewc import EWC
from clrun.strategies.fecam import FeCAM
from clrun.strategies.foster import FOSTER
from clrun.strategies.freezing import FreezeBackbone, TrainOnly
from clrun.strategies.gdumb import GDumb
from clrun.strategies.gem import GEM
from clrun.strategies.hat import HAT
from clrun.strategies.icarl import ICaRL
from clrun.strategies.inflora import InfLoRA
from clrun.strategies.l2p import L2P
from clrun.strategies.lucir import LUCIR
from clrun.strategies.lwf import LwF
from clrun.strategies.mas import MAS
from clrun.strategies.memo import MEMO
from clrun.strategies.packnet import PackNet
from clrun.strategies.pnn import PNN
from clrun.strategies.podnet import PODNet
from clrun.strategies.ranpac import RanPAC
from clrun.strategies.replay import Replay
from clrun.strategies.rwalk import RWalk
from clrun.strategies.si import SI
from clrun.strategies.simplecil import SimpleCIL
from clrun.strategies.slca import SLCA
from clrun.strategies.wa import WA
from clrun.strategies.xder import XDER

__all__ = [
    "AGEM",
    "APER",
    "CODAPrompt",
    "DER",
    "EASE",
    "ERACE",
    "EWC",
    "FOSTER",
    "L2P",
    "GEM",
    "HAT",
    "MAS",
    "PNN",
    "MEMO",
    "LUCIR",
    "PODNet",
    "SI",
    "SLCA",
    "WA",
    "XDER",
    "Amnesiac",
    "BiC",
    "Cumulative",
    "DualPrompt",
    "DynamicDER",
    "FeCAM",
    "FreezeBackbone",
    "GDumb",
    "ICaRL",
    "InfLoRA",
    "Joint",
    "LwF",
    "PackNet",
    "RWalk",
    "RanPAC",
    "Replay",
    "SimpleCIL",
    "TrainOnly",
]
