"""Parameter-efficient modules attached to a timm Vision Transformer: the one extension point for
changing a ViT's forward pass without touching the loop.

A strategy calls :func:`attach` (usually in ``pre_update``) with a kind and its options; the
modules become an :class:`Attachment` registered on the model under ``model.peft[name]``, and
change the forward pass of the model's ViT (``model.backbone.net``) through forward hooks on its
submodules (blocks, norms, linear layers); the hooks are bound methods of the attachment,
so a deep copy of the model (a teacher, a frozen copy) runs its own copy of them. So they are ordinary submodules of the model: the
optimiser (rebuilt after ``pre_update``) trains them, ``state_dict`` holds them, and a checkpoint
loads into a freshly built model: :class:`~clrun.models.CLModel` re-attaches every saved
attachment, described by its extra state (kind, options, trainable, active), before loading the
weights. The ViT's own keys (``backbone.net.*``) never change, so ``model.weights=<run dir>``
still loads the pre-trained backbone of a run that attached modules.

Kinds (``KINDS``; the defaults are LAMDA-PILOT's, the reference code of APER and EASE):

- ``adapter``: AdaptFormer's parallel bottleneck on each block's MLP: ``x + attn`` →
  ``x + mlp(norm2(x)) + scale · up(dropout(relu(down(x))))``; width 64, scale 0.1, dropout 0.1,
  down projection Kaiming-uniform, up projection and biases zero (the identity at the start);
- ``ssf``: scale-and-shift of the features (Lian et al., NeurIPS 2022) after the patch
  embedding, each block's norm1, qkv, attention projection, norm2, fc1, fc2, and the final norm;
  scales drawn from N(1, 0.02²), shifts from N(0, 0.02²);
- ``vpt_shallow`` / ``vpt_deep``: ``tokens`` (5) learnable prompt tokens appended after the
  patch tokens before the first block and removed after the last (shallow), or a fresh set
  before every block, removed after it (deep); initialised to zero as in PILOT;
- ``finetune``: no module; the whole ViT trains (its extra state remembers whether it trains);
- ``lora``: low-rank updates of the attention's q/k/v projections (:mod:`clrun.models.lora`;
  InfLoRA's branches).
- ``l2p`` / ``dualprompt`` / ``coda_prompt``: prompt pools with keys matched by a query pass of
  the frozen ViT (:mod:`clrun.models.prompts`).

Every kind but ``finetune`` freezes the ViT's own weights when attached (the papers keep the
pre-trained weights fixed) and makes its own modules trainable. An attachment whose ``active``
is false leaves the forward pass as it was: :func:`only` runs the model with a chosen set of
attachments (none: the pre-trained ViT). Prompts, prefixes and low-rank deltas of later methods
are further :class:`Attachment` subclasses registered in ``KINDS``: a hook on a block (prompts),
on ``attn.qkv`` (prefixes, LoRA) or on any linear layer.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from clrun.errors import ConfigError

__all__ = [
    "ADAPTERS",
    "KINDS",
    "Attachment",
    "attach",
    "attachments",
    "check_options",
    "find_vit",
    "only",
]


def find_vit(model: nn.Module, what: str = "this strategy") -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (a clrun model with ``model=timm``, its
    backbone, or the ViT itself); a one-line :class:`ConfigError` for anything else."""
    net = model
    for attr in ("backbone", "net"):
        net = getattr(net, attr, net)
    try:
        from timm.models.vision_transformer import VisionTransformer
    except Exception:  # noqa: BLE001 - no timm (or no torchvision under it)
        VisionTransformer = None  # noqa: N806
    if VisionTransformer is None or not isinstance(net, VisionTransformer):
        raise ConfigError(
            f"{what} needs a timm Vision Transformer (model=timm model.name=vit_...), not "
            f"{type(net).__name__}"
        )
    return net


class Attachment(nn.Module):
    """Modules attached to a ViT; subclasses register their hooks in ``install``.

    ``active``: whether the hooks change the forward pass. ``trainable``: whether the modules
    take gradients (``requires_grad``); both are saved with the model (extra state)."""

    kind = ""

    def __init__(self, vit: nn.Module, **options):
        super().__init__()
        self.options = dict(options)
        self.active = True
        object.__setattr__(self, "_vit", vit)  # not a submodule: its weights are the model's

    def install(self, vit: nn.Module) -> None:
        raise NotImplementedError

    def set_trainable(self, trainable: bool) -> None:
        self.requires_grad_(trainable)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def get_extra_state(self) -> dict:
        return {
            "kind": self.kind,
            "options": dict(self.options),
            "trainable": self.trainable,
            "active": self.active,
        }

    def set_extra_state(self, state: dict) -> None:
        self.active = bool(state["active"])
        self.set_trainable(bool(state["trainable"]))


class Bottleneck(nn.Module):
    """down → ReLU → dropout → up, times ``scale`` (the adapter of one block)."""

    def __init__(self, dim: int, width: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = nn.Linear(dim, width), nn.Linear(width, dim)
        self.scale, self.dropout = scale, dropout
        with torch.no_grad():  # LoRA-style init: the adapter starts as zero
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = nn.functional.dropout(torch.relu(self.down(x)), self.dropout, self.training)
        return self.up(h) * self.scale


class Adapter(Attachment):
    kind = "adapter"

    def __init__(self, vit, width: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__(vit, width=width, scale=scale, dropout=dropout)
        dim = vit.embed_dim
        self.blocks = nn.ModuleList(Bottleneck(dim, width, scale, dropout) for _ in vit.blocks)
        self._mid: dict[int, Tensor] = {}

    def install(self, vit: nn.Module) -> None:
        for i, blk in enumerate(vit.blocks):
            if not hasattr(blk, "norm2"):
                raise ConfigError(f"adapter: block {i} of {type(vit).__name__} has no norm2")
            blk.norm2.register_forward_pre_hook(partial(self._keep, i))
            blk.register_forward_hook(partial(self._add, i))

    def _keep(self, i: int, module, args):
        if self.active:
            self._mid[i] = args[0]  # the stream after attention: the adapter's input

    def _add(self, i: int, module, args, out):
        mid = self._mid.pop(i, None)
        if self.active and mid is not None:
            return out + self.blocks[i](mid)
        return None


def _scale_shift(dim: int) -> nn.Parameter:
    p = torch.empty(2, dim)
    nn.init.normal_(p[0], mean=1.0, std=0.02)
    nn.init.normal_(p[1], std=0.02)
    return nn.Parameter(p)


class SSF(Attachment):
    kind = "ssf"

    def __init__(self, vit):
        super().__init__(vit)
        self.ops = nn.ParameterDict(
            {name.replace(".", "_"): _scale_shift(dim) for name, dim in self._targets(vit)}
        )

    @staticmethod
    def _targets(vit: nn.Module) -> list[tuple[str, int]]:
        d = vit.embed_dim
        out = [("patch_embed", d)]
        for i, blk in enumerate(vit.blocks):
            out += [
                (f"blocks.{i}.norm1", d),
                (f"blocks.{i}.attn.qkv", blk.attn.qkv.out_features),
                (f"blocks.{i}.attn.proj", d),
                (f"blocks.{i}.norm2", d),
                (f"blocks.{i}.mlp.fc1", blk.mlp.fc1.out_features),
                (f"blocks.{i}.mlp.fc2", d),
            ]
        return [*out, ("norm", d)]

    def install(self, vit: nn.Module) -> None:
        for name, _ in self._targets(vit):
            key = name.replace(".", "_")
            vit.get_submodule(name).register_forward_hook(partial(self._scale_shift, key))

    def _scale_shift(self, key: str, module, args, out):
        if not self.active:
            return None
        scale, shift = self.ops[key]
        if out.dim() == 4:  # a conv patch embedding without flattening: channels first
            return out * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return out * scale + shift


class VPT(Attachment):
    deep = False

    def __init__(self, vit, tokens: int = 5):
        super().__init__(vit, tokens=tokens)
        layers = len(vit.blocks) if self.deep else 1
        self.prompts = nn.Parameter(torch.zeros(layers, tokens, vit.embed_dim))

    def install(self, vit: nn.Module) -> None:
        blocks = list(vit.blocks)
        n = self.options["tokens"]
        for i, blk in enumerate(blocks):
            if self.deep or i == 0:
                blk.register_forward_pre_hook(partial(self._prepend, i if self.deep else 0))
            if self.deep or i == len(blocks) - 1:
                blk.register_forward_hook(partial(self._drop, n))

    def _prepend(self, layer: int, module, args):
        if not self.active:
            return None
        x = args[0]
        p = self.prompts[layer].to(x.dtype).expand(x.shape[0], -1, -1)
        return (torch.cat([x, p], dim=1), *args[1:])

    def _drop(self, n: int, module, args, out):
        return out[:, :-n] if self.active else None


class VPTShallow(VPT):
    kind = "vpt_shallow"


class VPTDeep(VPT):
    kind = "vpt_deep"
    deep = True


class Finetune(Attachment):
    """No module: the ViT's own weights train while this is trainable."""

    kind = "finetune"

    def install(self, vit: nn.Module) -> None:
        pass

    def set_trainable(self, trainable: bool) -> None:
        self._vit.requires_grad_(trainable)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self._vit.parameters())


KINDS: dict[str, type[Attachment]] = {
    "adapter": Adapter,
    "ssf": SSF,
    "vpt_shallow": VPTShallow,
    "vpt_deep": VPTDeep,
    "finetune": Finetune,
}

from clrun.models.lora import LoRA  # noqa: E402 - lora.py subclasses Attachment (above)

KINDS["lora"] = LoRA


def check_options(kind: str, options: dict) -> None:
    """A one-line :class:`ConfigError` for an unknown kind or an option the kind does not take
    (strategies call it when they are built, before anything runs)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown parameter-efficient kind {kind!r}; one of {', '.join(KINDS)}")
    allowed = [n for n in inspect.signature(KINDS[kind]).parameters if n != "vit"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{kind} takes no option {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(allowed) or 'none'}"
        )


def attach(model: nn.Module, kind: str, name: str | None = None, **options) -> Attachment:
    """Attach modules of ``kind`` (``KINDS``) with ``options`` to the ViT of ``model`` (a clrun
    :class:`~clrun.models.CLModel` with a timm ViT backbone), as ``model.peft[name]`` (default:
    the kind). Every kind but ``finetune`` freezes the ViT's weights; the new modules train."""
    check_options(kind, options)
    vit = find_vit(model, f"attaching {kind}")
    name = name or kind
    if "peft" not in model._modules:
        model.peft = nn.ModuleDict()
    if name in model.peft:
        raise ValueError(f"the model already has an attachment called {name!r}")
    module = KINDS[kind](vit, **options)
    object.__setattr__(module, "_model", model)  # not a submodule: for passes with others off
    device = next(vit.parameters()).device
    module.to(device).train(model.training)
    if kind != "finetune":
        vit.requires_grad_(False)
    module.set_trainable(True)
    module.install(vit)
    model.peft[name] = module
    return module


def attachments(model: nn.Module) -> dict[str, Attachment]:
    """The model's attachments by name, in the order they were attached."""
    peft = model._modules.get("peft")
    return dict(peft.items()) if peft is not None else {}


@contextlib.contextmanager
def only(model: nn.Module, names: list[str] | tuple[str, ...]) -> Iterator[None]:
    """Run the model with only the named attachments active (``()``: the ViT as it is without
    any); the previous flags come back afterwards."""
    current = attachments(model)
    saved = {n: a.active for n, a in current.items()}
    try:
        for n, a in current.items():
            a.active = n in names
        yield
    finally:
        for n, a in current.items():
            a.active = saved[n]


def restore(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Re-attach the attachments a saved state dict describes (``peft.<name>._extra_state``)
    that ``model`` lacks, in their saved order, before its weights load. Their initial values
    are drawn without touching the global random state (they are overwritten right after)."""
    head = prefix + "peft."
    suffix = "._extra_state"
    for key, extra in state_dict.items():
        if not (key.startswith(head) and key.endswith(suffix)):
            continue
        name = key[len(head) : -len(suffix)]
        if "." in name or name in attachments(model):
            continue
        with torch.random.fork_rng(devices=[]):
            attach(model, extra["kind"], name, **extra["options"])


# the prompt kinds (l2p, dualprompt, coda_prompt) live in their own module
from clrun.models.prompts import KINDS as _PROMPT_KINDS  # noqa: E402

KINDS.update(_PROMPT_KINDS)

# the parameter-efficient modules a method may adapt a ViT with on its first experience (APER's
# and RanPAC's choices); prompts and low-rank branches belong to their own methods
ADAPTERS = ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune")
