"""One configuration for a federated run, shared by every driver (in-process, MQTT, `pqsu run`).

Schemes are presets over it:

  fedavg  dense fp32 FedAvg: unpruned model, fp32 downlink, every entry uploaded in fp32
  paper   FL-PQSU as published: pruned, int8 downlink, full int8 upload only when the loss improved
  ours    pruned, int8 downlink, top-k int8 with error feedback, selective upload
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from pqsu.cloud.aggregate import make_aggregator
from pqsu.cloud.prepare import PrepareConfig
from pqsu.cloud.server import ServerConfig
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.settings import read_settings

SCHEMES: dict[str, dict] = {
    "fedavg": dict(prune=None, precision="fp32", upload="always", select="fp32", error_feedback=False),
    "paper": dict(prune=0.5, precision="int8", upload="loss", select="dense", error_feedback=False),
    # Server momentum (FedAvgM) carries the error-feedback residuals' delayed mass forward; measured on
    # cnn / Fashion-MNIST / Dirichlet 0.5 it closes most of top-2%'s gap to dense FedAvg (docs/results.md).
    "ours": dict(prune=0.5, precision="int8", upload="norm:0.0001", select="topk:0.02", error_feedback=True,
                 server_momentum=0.5),
    # The paper table's ablation rows (pqsu bench paper): one technique added at a time.
    "prune30": dict(prune=0.3, precision="fp32", upload="always", select="fp32", error_feedback=False),
    "prune50": dict(prune=0.5, precision="fp32", upload="always", select="fp32", error_feedback=False),
    "prune70": dict(prune=0.7, precision="fp32", upload="always", select="fp32", error_feedback=False),
    "prune50+int8": dict(prune=0.5, precision="int8", upload="always", select="dense", error_feedback=False),
}


@dataclass(frozen=True)
class FederatedConfig:
    model: str = "cnn"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    clients: int = 10
    partition: str = "dirichlet:0.5"
    fraction: float = 1.0            # of the devices asked each round
    rounds: int = 10
    proxy_samples: int = 2000        # held by the cloud for round-0 pre-training, disjoint from devices'
    samples_per_client: int | None = None
    pretrain_epochs: float = 1.0
    finetune_epochs: float = 0.5
    prune: float | None = 0.5
    precision: str = "int8"
    upload: str = "norm:0.0001"
    select: str = "topk:0.02"
    error_feedback: bool = True
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    aggregator: str = "fedavg"
    clip_norm: float | str | None = None  # a bound, or "median[:F]": F x the round's median update norm
    server_lr: float = 1.0
    server_momentum: float = 0.0
    eval_samples: int | None = None  # the whole test split
    seed: int = 0

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp32"):
            raise PqsuError(f"precision must be int8 or fp32, got {self.precision!r}")
        if self.rounds < 1 or self.clients < 1 or not 0 < self.fraction <= 1:
            raise PqsuError("rounds and clients must be >= 1 and fraction in (0, 1]")
        if self.prune is not None and not 0 < self.prune < 1:
            raise PqsuError(f"prune ratio must be in (0, 1), got {self.prune}")
        make_aggregator(self.aggregator, {}, self.clip_norm)  # a bad spec fails here, before any work

    @classmethod
    def for_scheme(cls, scheme: str, **overrides) -> "FederatedConfig":
        if scheme not in SCHEMES:
            raise PqsuError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        return cls(**{**SCHEMES[scheme], **overrides})

    def server_config(self) -> ServerConfig:
        return ServerConfig(aggregator=self.aggregator, clip_norm=self.clip_norm, server_lr=self.server_lr,
                            server_momentum=self.server_momentum, precision=self.precision, epochs=self.epochs,
                            batch_size=self.batch_size, lr=self.lr, momentum=self.momentum, seed=self.seed)

    def prepare_config(self) -> PrepareConfig:
        return PrepareConfig(self.model, self.prune, self.pretrain_epochs, self.finetune_epochs,
                             self.batch_size, 0.01, self.seed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- command line (shared by `pqsu simulate`, `pqsu cloud` and `pqsu run`) --------------------
def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per FederatedConfig field, plus --scheme and --config."""
    p.add_argument("--config", metavar="FILE", help="settings file (TOML or JSON) with any of the options below, "
                   "named with underscores; flags given on the command line win")
    p.add_argument("--scheme", choices=list(SCHEMES), default=None,
                   help="preset: fedavg (dense fp32), paper (FL-PQSU as published) or ours (default); "
                        "the flags below override it")
    hints = typing.get_type_hints(FederatedConfig)
    for f in dataclasses.fields(FederatedConfig):
        kind = hints[f.name]
        base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), str)
        parse = _boolean if base is bool else _optional(_number_or_text if str in typing.get_args(kind) else base)
        metavar, text = FLAG_HELP.get(f.name, (base.__name__.upper(), ""))
        p.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None, metavar=metavar,
                       help=f"{text}default: {SCHEMES['ours'].get(f.name, f.default)} (ours)")


# Against poisoning (an enrolled device sending scaled or sign-flipped updates): docs/reliability.md.
FLAG_HELP = {
    "aggregator": ("SPEC", "fedavg, median or trimmed:F (per coordinate, drop the largest and smallest fraction F). "
                   "Against poisoning use median or trimmed:0.1 together with --clip-norm median; both reduce each "
                   "entry over the devices that sent it and hold the round's updates in memory; "),
    "clip_norm": ("NORM", "bound every update's L2 norm: a number, or median[:F] for F times the median norm of the "
                  "round's updates (follows the honest majority as updates shrink). Against poisoning: median, "
                  "which caps a scaled-up update at a typical one's size; "),
}


def config_from_args(args: argparse.Namespace) -> FederatedConfig:
    """Scheme preset, then the settings file, then command-line flags."""
    settings = read_settings(args.config) if getattr(args, "config", None) else {}
    scheme = args.scheme or settings.pop("scheme", "ours")
    names = {f.name for f in dataclasses.fields(FederatedConfig)}
    values = {k: v for k, v in settings.items() if k in names}
    values.update({n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    try:
        return FederatedConfig.for_scheme(scheme, **values)
    except TypeError as exc:
        raise PqsuError(f"bad setting: {exc}") from None


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


