"""Backbones: the networks that map inputs to features, each built with one of our heads.

Options (``model=``): ``mlp`` (any input, flattened), ``cnn`` (small conv net, any image size),
``resnet18_reduced`` (the reduced ResNet-18 of GEM, nf=20), ``resnet18`` (the CIFAR ResNet-18:
3×3 stem, no max-pool, 64..512 channels), ``resnet32`` (the CIFAR-100 ResNet-32 of iCaRL/FACIL),
``mobilenet_v1`` (architecture only, no weights) and ``torchvision`` (any torchvision
classification model by name, with its classifier replaced by our head; needs the ``vision``
extra). Every builder takes ``(input_shape, n_classes, head, ...)`` and returns a
:class:`~clrun.models.heads.CLModel`.

BatchNorm. The ResNets and MobileNet use BatchNorm: in training mode it normalises with batch
statistics (noisy for tiny batches, e.g. online streams of a few samples; an error where a
feature map holds one value per channel), in eval mode with running statistics. Per-sample
gradients (EWC's Fisher through ``torch.func.functional_call`` + ``vmap``) must run the model in
eval mode, as the EWC component does; every model here supports that (tested).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.checks import (
    Rule,
    boolean,
    int_at_least,
    is_int,
    is_number,
    number_above,
    one_of,
    probability_below_one,
    require,
)
from clrun.models.heads import CLModel, make_head, with_head


def mlp(
    input_shape: Sequence[int],
    n_classes: int,
    head: str = "single",
    hidden_sizes: Sequence[int] = (400, 400),
    dropout: float = 0.0,
    init: str = "default",
    init_std: float = 0.1,
    init_bias: float = 0.1,
    batch_norm: bool = False,
) -> CLModel:
    """Fully connected ReLU network on flattened inputs (the Split/Permuted MNIST MLP).

    ``batch_norm``: each hidden layer is a linear map without bias, batch normalisation and the
    ReLU (GDumb's MLP; their code also normalises the output layer's logits, which we do not).

    ``init``: ``default`` keeps PyTorch's initialisation of ``nn.Linear``; ``truncated_normal``
    draws every weight from a normal of std ``init_std`` truncated at ±2 std and sets every bias
    to ``init_bias``, the TensorFlow-era initialisation of the A-GEM and RWalk authors' code
    (``tf.truncated_normal_initializer(stddev=0.1)``, biases 0.1); ``xavier_uniform`` draws every
    weight from U(−a, a), a = √(6 / (fan_in + fan_out)), and sets every bias to 0, the
    initialisation of the DER authors' code (Mammoth's MLP). Either applies to the layers the
    model is built with; units an incremental or multi head grows later keep PyTorch's."""
    require("model.dropout", dropout, probability_below_one())
    require("model.hidden_sizes", hidden_sizes, POSITIVE_INTS)
    require("model.batch_norm", batch_norm, boolean())
    require("model.init", init, one_of(MLP_INITS))
    require("model.init_std", init_std, number_above(0))
    require("model.init_bias", init_bias, Rule(is_number, "a finite number"))
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden_sizes:
        layers.append(nn.Linear(width, int(h), bias=not batch_norm))
        layers += [nn.BatchNorm1d(int(h)), nn.ReLU()] if batch_norm else [nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    model = CLModel(nn.Sequential(*layers), make_head(head, width, n_classes))
    if init != "default":
        with torch.no_grad():
            for m in model.modules():
                if not (isinstance(m, nn.Linear) and m.weight.numel()):
                    continue
                if init == "truncated_normal":
                    nn.init.trunc_normal_(m.weight, 0.0, init_std, -2 * init_std, 2 * init_std)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    m.bias.fill_(init_bias if init == "truncated_normal" else 0.0)
    return model


MLP_INITS = ("default", "truncated_normal", "xavier_uniform")
# hidden layer widths; an empty list leaves a linear classifier on the flattened inputs
POSITIVE_INTS = Rule(
    lambda v: (
        isinstance(v, Sequence) and not isinstance(v, str) and all(is_int(h) and h >= 1 for h in v)
    ),
    "a list of integers ≥ 1",
)


def cnn(
    input_shape: Sequence[int],
    n_classes: int,
    head: str = "single",
    channels: Sequence[int] = (32, 64),
    dropout: float = 0.0,
) -> CLModel:
    """A small convolutional network: per stage two 3×3 conv + ReLU and a 2×2 max-pool, then
    global average pooling. Works for any image size."""
    require("model.dropout", dropout, probability_below_one())
    layers: list[nn.Module] = []
    c_in = _image_channels(input_shape, "cnn")
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)]
        layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return CLModel(nn.Sequential(*layers), make_head(head, c_in, n_classes))


# --------------------------------------------------------------------------- conv backbones


def _image_channels(input_shape: Sequence[int], model: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(
            f"model={model} needs image inputs (C, H, W); this benchmark gives {tuple(input_shape)}"
            " (use model=mlp for vectors)"
        )
    return int(input_shape[0])


class BasicBlock(nn.Module):
    """Two 3×3 conv + BatchNorm; identity shortcut, or 1×1 conv + BatchNorm where the shape
    changes (GEM's and FACIL's CIFAR ResNets)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu_out = True  # False: no ReLU after the sum (LUCIR's and PODNet's last block)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return torch.relu(out) if self.relu_out else out


class ResNet(nn.Module):
    """CIFAR-style ResNet features: 3×3 stride-1 stem + BatchNorm + ReLU (no max-pool), stages of
    basic blocks (the first block of every stage after the first halves the resolution), global
    average pooling. On 32×32 inputs the pooling equals GEM's ``avg_pool2d(out, 4)`` (ResNet-18)
    and FACIL's ``AvgPool2d(8)`` (ResNet-32); on other sizes it still gives ``out_features``."""

    def __init__(self, in_channels: int, stem: int, widths: Sequence[int], blocks: Sequence[int]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        stages, c_in = [], stem
        for i, (width, n) in enumerate(zip(widths, blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c_in, width, 2 if i > 0 and j == 0 else 1))
                c_in = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.out_features = c_in

    def forward(self, x: Tensor) -> Tensor:
        out = self.stages(torch.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def memo_split(self) -> tuple[nn.Module, nn.Module]:
        """MEMO's (Zhou et al., ICLR 2023) split of this network, its own modules (not copies):
        generalised blocks = the stem and every stage but the last; specialised blocks = the last
        stage and the pooling. PyCIL's convs/memo_cifar_resnet.py splits ResNet-32 so (stages 1-2
        / stage 3), convs/memo_resnet.py ResNet-18 (layers 1-3 / layer 4)."""
        shared = nn.Sequential(self.conv1, self.bn1, nn.ReLU(), *self.stages[:-1])
        specialised = nn.Sequential(self.stages[-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return shared, specialised


def resnet18_reduced(
    input_shape: Sequence[int], n_classes: int, head: str = "single", nf: int = 20
) -> CLModel:
    """The reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017) and A-GEM: basic blocks
    [2, 2, 2, 2] with nf, 2nf, 4nf, 8nf channels (nf=20: 160 features, ~1.1M parameters)."""
    require("model.nf", nf, int_at_least(1))
    c = _image_channels(input_shape, "resnet18_reduced")
    backbone = ResNet(c, nf, [nf, 2 * nf, 4 * nf, 8 * nf], [2, 2, 2, 2])
    return CLModel(backbone, make_head(head, backbone.out_features, n_classes))


def resnet18(input_shape: Sequence[int], n_classes: int, head: str = "single") -> CLModel:
    """ResNet-18 for CIFAR-sized inputs (3×3 stem, no max-pool; 64, 128, 256, 512 channels;
    ~11M parameters): the reduced ResNet-18 at nf=64, as in DER, Mammoth and PyCIL."""
    c = _image_channels(input_shape, "resnet18")
    backbone = ResNet(c, 64, [64, 128, 256, 512], [2, 2, 2, 2])
    return CLModel(backbone, make_head(head, backbone.out_features, n_classes))


def resnet32(input_shape: Sequence[int], n_classes: int, head: str = "single") -> CLModel:
    """The CIFAR-100 ResNet-32 of iCaRL as FACIL implements it: 3 stages of 5 basic blocks with
    16, 32, 64 channels (1×1-conv shortcuts), 64 features, ~0.46M parameters; Kaiming-normal
    (fan-out) conv init, BatchNorm weight 1 and bias 0."""
    c = _image_channels(input_shape, "resnet32")
    backbone = ResNet(c, 16, [16, 32, 64], [5, 5, 5])
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return CLModel(backbone, make_head(head, backbone.out_features, n_classes))


MOBILENET_V1 = (  # (output channels, stride) of the 13 depthwise-separable blocks
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


def mobilenet_v1(
    input_shape: Sequence[int],
    n_classes: int,
    head: str = "single",
    width_multiplier: float = 1.0,
    stem_stride: int = 1,
) -> CLModel:
    """MobileNet v1 (Howard et al. 2017), architecture only (no pretrained weights): a 3×3 conv
    with 32 channels, then 13 depthwise-separable blocks (3×3 depthwise + BN + ReLU, 1×1
    pointwise + BN + ReLU) up to 1024 channels, global average pooling. ``width_multiplier``
    (α) scales every width; ``stem_stride`` is 2 in the paper (224×224 inputs) and 1 for
    32×32 inputs (the usual CIFAR variant)."""
    require("model.width_multiplier", width_multiplier, number_above(0))
    require("model.stem_stride", stem_stride, one_of((1, 2)))
    c_in = _image_channels(input_shape, "mobilenet_v1")

    def width(c: int) -> int:
        return max(8, int(c * width_multiplier))

    def conv_bn(c_in: int, c_out: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]

    layers = conv_bn(c_in, width(32), 3, stem_stride)
    c = width(32)
    for c_out, stride in MOBILENET_V1:
        layers += conv_bn(c, c, 3, stride, groups=c)  # depthwise
        layers += conv_bn(c, width(c_out), 1, 1)  # pointwise
        c = width(c_out)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return CLModel(nn.Sequential(*layers), make_head(head, c, n_classes))


class _ToRGB(nn.Module):
    """Repeat a single input channel three times (grey images into an RGB network)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)


def torchvision_model(
    input_shape: Sequence[int],
    n_classes: int,
    head: str = "single",
    name: str = "resnet18",
    weights: str | None = None,
) -> CLModel:
    """Any torchvision classification model by name (``torchvision.models.get_model``), its
    final linear classifier replaced by our head (:func:`with_head`). ``weights`` (e.g.
    ``DEFAULT``) loads pretrained weights, which torchvision downloads unless they are in the
    torch hub cache already. Grey (1-channel) inputs are repeated to 3 channels."""
    from clrun.datasets import require_torchvision

    tv = require_torchvision(f"model=torchvision (model.name={name})")
    c = _image_channels(input_shape, "torchvision")
    if c not in (1, 3):
        raise ValueError(f"model=torchvision takes 1- or 3-channel images, not {c} channels")
    available = tv.models.list_models(module=tv.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"model.name={name!r} is not a torchvision classification model{hint}; see "
            "torchvision.models.list_models(module=torchvision.models)"
        )
    module = tv.models.get_model(name, weights=weights)
    model = with_head(module, n_classes, head)
    if c == 1:
        model.backbone = nn.Sequential(_ToRGB(), model.backbone)
    return model
