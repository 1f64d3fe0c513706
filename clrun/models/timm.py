"""Any timm model as a backbone (``model=timm``), with weights from nowhere, the Hugging Face hub,
a file, or an earlier clrun run.

The timm model is built with ``num_classes=0``, so it returns its pooled embedding (the [CLS]
token or the global pool, as the model defines it); our head sits on top, as on every model.
The model reports what input it takes (:class:`~clrun.benchmarks.InputSpec`: 3 channels, its
image size, the normalisation of its weights), and the runner makes every benchmark's batches
fit on the device: 1×28×28 MNIST digits become 3×img_size×img_size, standardised with the
weights' mean and std.

``model.weights``:

- ``none``: random initialisation (timm's own init);
- ``hub``: timm's pretrained tag for ``model.name``, downloaded through the Hugging Face hub (cached
  in ``~/.cache/huggingface``). Offline it is a one-line error saying which file to fetch and
  where to point ``model.weights``;
- a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` state dict in timm's naming (as
  published with the model; a ``model`` or ``state_dict`` entry is unwrapped, the classifier
  dropped, the position embedding resampled by timm's own filter for another image or patch
  size). Keys that do not match are listed one by one;
- a clrun run directory: the backbone of that run's final model (``checkpoint/state.pt``), e.g.
  a ViT pretrained with ``strategy=joint`` on one benchmark, continued on another.

``model.freeze``: ``none`` trains everything; ``backbone`` freezes the timm model (its
``requires_grad`` off), so only the head and modules attached later (adapters, prompts) train.

Needs the ``pretrained`` extra (``pip install 'clrun[pretrained]'``: timm, which needs a
torchvision that loads beside your torch, safetensors, huggingface_hub).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from clrun.benchmarks import InputSpec
from clrun.checks import Rule, int_at_least, one_of, optional, require
from clrun.errors import ConfigError, RunFailure
from clrun.models.heads import CLModel, make_head

FREEZE = ("none", "backbone")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsUnavailable(RunFailure):
    """Pre-trained weights that cannot be obtained (offline hub, missing file): exit 4."""


def require_timm(what: str):
    try:
        return importlib.import_module("timm")
    except Exception as e:  # noqa: BLE001 - ImportError, or torchvision failing inside timm
        raise ConfigError(
            f"{what} needs timm ({type(e).__name__}: {' '.join(str(e).split())[:160]}): "
            "pip install 'clrun[pretrained]' (on a CPU-only torch: pip install torch==2.14.1 "
            "torchvision==0.29.1 timm)"
        ) from None


class TimmBackbone(nn.Module):
    """A timm model without its classifier: ``forward(x)`` → the pooled embedding (B, D).
    ``net`` is the timm model (attach parameter-efficient modules to it), ``feature_dim`` D."""

    def __init__(self, net: nn.Module, name: str):
        super().__init__()
        self.net, self.name = net, name
        self.feature_dim = int(net.num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def timm_model(
    input_shape: Sequence[int],
    n_classes: int,
    head: str = "incremental",
    name: str = "vit_base_patch16_224",
    weights: str = "none",
    img_size: int | None = None,
    patch_size: int | None = None,
    freeze: str = "none",
    drop_path_rate: float = 0.0,
    create_args: dict | None = None,
) -> CLModel:
    """A timm model by name (``timm.list_models()``) with one of our heads; see the module
    docstring for ``weights`` and ``freeze``. ``img_size`` / ``patch_size`` (null: the model's
    own) go to timm's constructor, e.g. ``vit_tiny_patch16_224`` with ``img_size=32
    patch_size=4`` for 32×32 inputs; ``create_args`` are further keyword arguments of
    ``timm.create_model`` (``{depth: 2}``: a two-block ViT for quick tests)."""
    timm = require_timm(f"model=timm (model.name={name})")
    require("model.freeze", freeze, one_of(FREEZE))
    size_rule = optional(int_at_least(1), "null (the model's own)")
    require("model.img_size", img_size, size_rule)
    require("model.patch_size", patch_size, size_rule)
    require(
        "model.weights",
        weights,
        Rule(
            lambda v: isinstance(v, str) and v != "",
            "none, hub, a .safetensors/.pth file or a clrun run directory",
        ),
    )
    if len(input_shape) != 3:
        raise ConfigError(
            f"model=timm takes images (C, H, W), not inputs shaped {tuple(input_shape)}"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"model.name={name!r} is not a timm model{hint}; see timm.list_models()")
    kwargs = {**dict(create_args or {}), "num_classes": 0, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    net = _create(timm, name, weights, kwargs)
    if weights not in ("none", "hub"):
        _load_weights(net, name, weights)
    spec = _input_spec(net)
    backbone = TimmBackbone(net, name)
    if freeze == "backbone":
        backbone.requires_grad_(False)
    model = CLModel(backbone, make_head(head, backbone.feature_dim, n_classes))
    model.input_spec = spec
    return model


def _create(timm, name: str, weights: str, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=weights == "hub", **kwargs)
    except TypeError as e:  # e.g. patch_size for a model that has none
        raise ConfigError(f"model=timm model.name={name}: {' '.join(str(e).split())}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if weights != "hub":
            raise
        hub_id = _hub_id(timm, name)
        raise WeightsUnavailable(
            f"model.weights=hub: timm could not fetch the weights of {name} "
            f"({type(e).__name__}; offline?). Download model.safetensors from "
            f"https://huggingface.co/{hub_id} and set model.weights=/path/to/model.safetensors"
        ) from None


def _hub_id(timm, name: str) -> str:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
        return getattr(cfg, "hf_hub_id", None) or f"timm/{name}"
    except Exception:  # noqa: BLE001 - only for the message
        return f"timm/{name}"


def _input_spec(net: nn.Module) -> InputSpec:
    """The input the model takes: its image size (as built) and its weights' normalisation."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if size is None:
        size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    return InputSpec(
        channels=3,
        size=tuple(int(s) for s in size),
        mean=tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225))),
    )


def _load_weights(net: nn.Module, name: str, weights: str) -> None:
    """Load a state dict file or a clrun run's backbone into ``net``; every mismatch is listed."""
    path = Path(weights).expanduser()
    if path.is_dir():
        state = _from_run(path, name)
    elif path.is_file():
        state = _from_file(path)
        state = _filtered(net, state)
    else:
        raise WeightsUnavailable(
            f"model.weights={weights!r}: no such file or run directory; give none, hub, a "
            f"{'/'.join(WEIGHT_SUFFIXES)} state dict in timm's naming, or a clrun run directory"
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    shapes = []
    if missing or unexpected:
        own = net.state_dict()
        shapes = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:8])}{_more(missing)})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:8])}{_more(unexpected)})"
            )
        raise ConfigError(
            f"model.weights={weights}: the state dict does not fit {name}: " + "; ".join(parts)
        )


def _more(keys: list) -> str:
    return f", … {len(keys) - 8} more" if len(keys) > 8 else ""


def _from_file(path: Path) -> dict[str, Tensor]:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(
            f"model.weights={str(path)!r}: expected a {' / '.join(WEIGHT_SUFFIXES)} state dict"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(
                f"model.weights={path} needs safetensors: pip install 'clrun[pretrained]'"
            ) from None
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state"):  # common wrappers of published files
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights={path}: holds a {type(state).__name__}, not a state dict")
    return state


def _filtered(net: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's own checkpoint filter for the model's family (position-embedding resampling,
    renamed keys), then the classifier dropped: the model is built without one."""
    module = importlib.import_module(type(net).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, net)
    classifier = (getattr(net, "pretrained_cfg", None) or {}).get("classifier", "head")
    names = [classifier] if isinstance(classifier, str) else list(classifier)
    own = set(net.state_dict())
    return {
        k: v
        for k, v in state.items()
        if k in own or not any(k == n or k.startswith(n + ".") for n in names)
    }


def _from_run(run_dir: Path, name: str) -> dict[str, Tensor]:
    """The timm backbone of a clrun run's final model (its checkpoint)."""
    from clrun import checkpoint

    saved = checkpoint.load(run_dir, torch.device("cpu"))
    if saved is None:
        raise WeightsUnavailable(
            f"model.weights={run_dir}: no checkpoint ({checkpoint.FILE}) in that run directory"
        )
    prefix = "backbone.net."
    state = {k[len(prefix) :]: v for k, v in saved["model"].items() if k.startswith(prefix)}
    if not state:
        model = (saved.get("config") or {}).get("model", {}).get("_target_", "?")
        raise ConfigError(
            f"model.weights={run_dir}: that run's model ({model}) is not a timm model; "
            "pretrain with model=timm"
        )
    trained = (saved.get("config") or {}).get("model", {}).get("name")
    if trained is not None and trained != name:
        raise ConfigError(
            f"model.weights={run_dir}: that run trained model.name={trained}, not {name}"
        )
    return state
