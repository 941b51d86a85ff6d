"""The model zoo: every architecture is built from a *widths spec*.

A widths spec is the list of channel / neuron counts of the prunable layers, in a
fixed order per architecture. Pruning changes only these numbers, so a board that
receives `{"arch": "vgg16", "widths": [...]}` in the ONNX metadata can rebuild the
exact torch module and load the dequantized weights into it.

Convolutions live in `nn.Sequential` containers as (conv, batchnorm, relu). With
`batchnorm=False` the batchnorm slot holds an `nn.Identity` and the conv gets a bias,
so a BN-folded model (see `pruning.fold_batchnorm`) and a model built without BN
have the same state_dict keys: that is what lets the int8 ONNX weights, exported
under the conv's names, flow back into torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from pqsu.protocol.errors import PqsuError


class ZooError(PqsuError):
    """Unknown architecture or a widths spec that does not fit it."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a zoo model anywhere (travels in ONNX metadata)."""

    arch: str
    widths: tuple[int, ...]
    in_shape: tuple[int, ...] = (1, 28, 28)  # (C, H, W) images, (C, L) sensor windows
    num_classes: int = 10
    batchnorm: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["in_shape"] = list(self.widths), list(self.in_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        try:
            return cls(arch=str(d["arch"]), widths=tuple(int(w) for w in d["widths"]),
                       in_shape=tuple(int(s) for s in d["in_shape"]),  # type: ignore[arg-type]
                       num_classes=int(d["num_classes"]), batchnorm=bool(d["batchnorm"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ZooError(f"incomplete model spec {d!r}: {exc}") from None


def conv_block(cin: int, cout: int, batchnorm: bool, kernel: int = 3, stride: int = 1,
               relu: bool = True) -> list[nn.Module]:
    pad = kernel // 2
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=not batchnorm),
        nn.BatchNorm2d(cout) if batchnorm else nn.Identity(),
    ]
    if relu:
        layers.append(nn.ReLU())
    return layers


class PlainNet(nn.Module):
    """features (conv blocks and pools) -> flatten -> classifier (linear, relu)* -> linear.

    `plan` mixes conv widths and "M" (2x2 max-pool); `fc` are hidden linear widths.
    cnn, alexnet and vgg16 are all this shape, they differ only in plan and pooling.
    """

    def __init__(self, spec: ModelSpec, plan: list, n_fc: int, ceil_pool: bool):
        super().__init__()
        conv_widths, fc_widths = list(spec.widths[: len(spec.widths) - n_fc]), list(spec.widths[len(spec.widths) - n_fc:])
        layers: list[nn.Module] = []
        cin, it = spec.in_shape[0], iter(conv_widths)
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=ceil_pool))
            else:
                cout = next(it)
                layers += conv_block(cin, cout, spec.batchnorm)
                cin = cout
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        with torch.no_grad():  # the flattened size depends on the input shape: measure it
            n_flat = self.flatten(self.features(torch.zeros(1, *spec.in_shape))).shape[1]
        self.classifier = classifier_head(n_flat, fc_widths, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.features(x)))

    def widths(self) -> tuple[int, ...]:
        convs = [m.out_channels for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m.out_features for m in self.classifier if isinstance(m, nn.Linear)][:-1]
        return tuple(convs + fcs)


def classifier_head(n_in: int, widths, num_classes: int) -> nn.Sequential:
    """(linear, relu) per hidden width, then the linear layer to the classes."""
    head: list[nn.Module] = []
    for width in widths:
        head += [nn.Linear(n_in, width), nn.ReLU()]
        n_in = width
    head.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*head)


class SensorNet(nn.Module):
    """1-D conv net for sensor windows (C, L): (conv1d, batchnorm, relu) blocks with a 2x max-pool
    after the first two, global average pooling over time, then (linear, relu)* -> linear.

    Average pooling over time makes the classifier independent of the window length, so one
    widths spec fits 24 hourly readings and 128-sample accelerometer windows alike.
    """

    def __init__(self, spec: ModelSpec, kernels: tuple[int, ...], n_fc: int):
        super().__init__()
        if len(spec.in_shape) != 2:
            raise RuntimeError(f"it takes (channels, length) windows, not input {tuple(spec.in_shape)}")
        conv_widths, fc_widths = spec.widths[: len(spec.widths) - n_fc], spec.widths[len(spec.widths) - n_fc:]
        layers: list[nn.Module] = []
        cin = spec.in_shape[0]
        for i, (cout, k) in enumerate(zip(conv_widths, kernels)):
            layers += [nn.Conv1d(cin, cout, k, padding=k // 2, bias=not spec.batchnorm),
                       nn.BatchNorm1d(cout) if spec.batchnorm else nn.Identity(), nn.ReLU()]
            if i < 2:
                layers.append(nn.MaxPool1d(2, ceil_mode=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.flatten = nn.Flatten()
        self.classifier = classifier_head(cin, fc_widths, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))

    def widths(self) -> tuple[int, ...]:
        convs = [m.out_channels for m in self.features if isinstance(m, nn.Conv1d)]
        fcs = [m.out_features for m in self.classifier if isinstance(m, nn.Linear)][:-1]
        return tuple(convs + fcs)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int, batchnorm: bool):
        super().__init__()
        self.branch = nn.Sequential(*conv_block(cin, mid, batchnorm, stride=stride),
                                    *conv_block(mid, cout, batchnorm, relu=False))
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(*conv_block(cin, cout, batchnorm, kernel=1, stride=stride, relu=False))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.branch(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3x3 stem, no stem pool).

    widths = [stage1, stage2, stage3, stage4, inner1 .. inner8]: a stage width is shared
    by every tensor its skip connections add together (the stem included for stage 1),
    an inner width is the first conv of each of the 8 basic blocks.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        stages, inner = spec.widths[:4], spec.widths[4:]
        self.stem = nn.Sequential(*conv_block(spec.in_shape[0], stages[0], spec.batchnorm))
        blocks, cin = [], stages[0]
        for s, cout in enumerate(stages):
            for b in range(2):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, inner[2 * s + b], cout, stride, spec.batchnorm))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.blocks(self.stem(x)))))

    def widths(self) -> tuple[int, ...]:
        stages = [self.stem[0].out_channels] + [self._block_out(i) for i in (2, 4, 6)]
        inner = [blk.branch[0].out_channels for blk in self.blocks]
        return tuple(stages + inner)

    def _block_out(self, i: int) -> int:
        return next(m.out_channels for m in reversed(self.blocks[i].branch) if isinstance(m, nn.Conv2d))


VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
ALEXNET_PLAN = [96, "M", 256, "M", 384, 384, 256, "M"]
CNN_PLAN = [32, "M", 64, "M"]


@dataclass(frozen=True)
class _Arch:
    default_widths: tuple[int, ...]
    batchnorm: bool
    build: object = field(repr=False)
    about: str = ""
    input_rank: int = 3  # (C, H, W) images; 2 for (C, L) windows


def _plain(plan: list, n_fc: int, ceil_pool: bool):
    return lambda spec: PlainNet(spec, plan, n_fc, ceil_pool)


def _convs(plan: list) -> tuple[int, ...]:
    return tuple(w for w in plan if w != "M")


ARCHS: dict[str, _Arch] = {
    "cnn": _Arch(_convs(CNN_PLAN) + (128,), False, _plain(CNN_PLAN, 1, False),
                 "2 conv + 1 hidden fc, ~0.4M params: tests and tiny boards"),
    "alexnet": _Arch(_convs(ALEXNET_PLAN) + (4096, 4096), False, _plain(ALEXNET_PLAN, 2, False),
                     "FL-PQSU paper AlexNet: conv 96-256-384-384-256, fc 4096-4096"),
    # ceil-mode pools take 28x28 down to 1x1 in five steps, as 32x32 goes, so one plan fits both.
    "vgg16": _Arch(_convs(VGG16_PLAN) + (512, 512), True, _plain(VGG16_PLAN, 2, True),
                   "FL-PQSU paper VGG16 with BatchNorm, fc 512-512"),
    "cnn1d": _Arch((32, 64, 64, 64), True, lambda spec: SensorNet(spec, (7, 5, 3), 1),
                   "1-D conv 32-64-64 + fc 64 with BatchNorm for sensor windows (C, L), ~35k params", 2),
    "resnet18": _Arch((64, 128, 256, 512) + (64, 64, 128, 128, 256, 256, 512, 512), True, ResNet18,
                      "CIFAR-style ResNet-18: skip connections couple channels"),
}


def default_spec(arch: str, in_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 batchnorm: bool | None = None) -> ModelSpec:
    entry = _arch(arch)
    return ModelSpec(arch, entry.default_widths, tuple(in_shape), num_classes,  # type: ignore[arg-type]
                     entry.batchnorm if batchnorm is None else batchnorm)


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised torch model for `spec` (pruned widths included)."""
    entry = _arch(spec.arch)
    if len(spec.in_shape) != entry.input_rank:
        kinds = {2: "sensor windows (C, L)", 3: "images (C, H, W)"}
        fits = [name for name, a in ARCHS.items() if a.input_rank == len(spec.in_shape)]
        raise ZooError(f"{spec.arch} takes {kinds[entry.input_rank]}, not input {tuple(spec.in_shape)}"
                       + (f"; for this input choose {', '.join(fits)} or your own package.module:factory" if fits else
                          "; give your own package.module:factory for this input"))
    if len(spec.widths) != len(entry.default_widths) or any(w < 1 for w in spec.widths):
        raise ZooError(f"{spec.arch} takes {len(entry.default_widths)} positive widths, got {list(spec.widths)}")
    try:
        model = entry.build(spec)  # type: ignore[operator]
    except RuntimeError as exc:  # e.g. an input too small for the pools
        raise ZooError(f"cannot build {spec.arch} for input {spec.in_shape}: {exc}") from None
    model.spec = spec
    return model


def _arch(name: str) -> _Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ZooError(f"unknown model {name!r}; choose one of: {', '.join(ARCHS)}") from None
