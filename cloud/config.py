"""One configuration for a federated run, shared by every driver (in-process, MQTT, `pqsu run`).

Schemes are presets over it:

  fedavg  dense fp32 FedAvg: unpruned model, fp32 downlink, every entry uploaded in fp32
  paper   FL-PQSU as published: pruned, int8 downlink, full int8 upload only when the loss improved
  ours    pruned, int8 downlink, top-k int8 with error feedback, selective upload
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import numbers
import typing
from dataclasses import dataclass

from pqsu.export import prune_spec
from pqsu.protocol.errors import PqsuError
from pqsu.protocol.settings import read_settings

if typing.TYPE_CHECKING:
    from pqsu.cloud.prepare import PrepareConfig
    from pqsu.cloud.server import ServerConfig

DOWNLINKS = ("full", "hard", "soft")  # cloud/downlink.py KEYFRAME_POLICIES (named here: no numpy to parse flags)

# What a user chooses between. The bench's ablation rows (prune30, prune50+int8...) are built in
# tools/bench/paper.py over these, so they do not show up among --scheme's choices.
SCHEMES: dict[str, dict] = {
    "fedavg": dict(prune=None, precision="fp32", upload="always", select="fp32", error_feedback=False,
                   downlink="full"),
    # The paper ships the whole int8 model every round, as published.
    "paper": dict(prune=0.5, precision="int8", upload="loss", select="dense", error_feedback=False, downlink="full"),
    # Server momentum (FedAvgM) carries the error-feedback residuals' delayed mass forward; measured on
    # cnn / Fashion-MNIST / Dirichlet 0.5 it closes most of top-2%'s gap to dense FedAvg (docs/results.md).
    "ours": dict(prune=0.5, precision="int8", upload="norm:0.0001", select="topk:0.02", error_feedback=True,
                 server_momentum=0.5),
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
    prune: float | str | None = 0.5   # a ratio, or "auto:PT" (pqsu.export.prune_spec)
    importance: str = "l1"
    ranking: str = "uniform"
    distill: float = 0.0
    prune_steps: int = 1
    precision: str = "int8"
    upload: str = "norm:0.0001"
    select: str = "topk:0.02"
    error_feedback: bool = True
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    local_prox: float = 0.0          # FedProx mu (0: plain local SGD)
    aggregator: str = "fedavg"
    clip_norm: float | str | None = None  # a bound, or "median[:F]": F x the round's median update norm
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_opt: str = "fedavgm"
    eval_samples: int | None = None  # the whole test split
    seed: int = 0
    # The downlink (cloud/downlink.py; defaults measured, docs/design.md "Downlink").
    downlink: str = "hard"           # keyframe policy: full (no patches), hard or soft
    keyframe_every: int | None = None
    keyframe_clip: float | None = 0.01
    patch_cap: int | float | None = None  # bytes, or a fraction of the int8 model file (DownlinkConfig)
    patch_deadband: float = 0.5
    patch_bases: int = 4
    keyframe_headroom: float = 1.5
    patch_saturate: bool = False     # the master's weights clipped to the held scales (DownlinkConfig.saturate)

    def __post_init__(self) -> None:
        from pqsu.cloud.aggregate import make_aggregator  # numpy: not needed to build a parser
        from pqsu.cloud.strategies import make_strategy

        for name, kind in field_types().items():
            check_type(name, getattr(self, name), kind)
        if self.precision not in ("int8", "fp32"):
            raise PqsuError(f"precision must be int8 or fp32, got {self.precision!r}")
        if not 0 <= self.local_prox <= 1000:
            raise PqsuError(f"local_prox must be in [0, 1000], got {self.local_prox}")
        if self.rounds < 1 or self.clients < 1 or not 0 < self.fraction <= 1:
            raise PqsuError("rounds and clients must be >= 1 and fraction in (0, 1]")
        if self.downlink not in DOWNLINKS:
            raise PqsuError(f"downlink must be one of {', '.join(DOWNLINKS)}, got {self.downlink!r}")
        if (self.keyframe_every is not None and self.keyframe_every < 1) or self.patch_bases < 1 \
                or self.keyframe_headroom < 1 or (self.keyframe_clip is not None and not 0 <= self.keyframe_clip < 1):
            raise PqsuError("keyframe_every and patch_bases must be >= 1, keyframe_headroom >= 1 and keyframe_clip "
                            "in [0, 1)")
        cap = self.patch_cap
        if cap is not None and not (cap >= 256 if isinstance(cap, numbers.Integral) else 0 < cap < 1):
            raise PqsuError(f"patch_cap must be a number of bytes >= 256 or a fraction of the model file in (0, 1), "
                            f"got {cap}")
        if not 0.5 <= self.patch_deadband <= 4 or (self.patch_deadband > 0.5 and self.patch_cap is not None):
            raise PqsuError(f"patch_deadband must be in [0.5, 4] steps (0.5: exact patches), and not combined with "
                            f"patch_cap; got {self.patch_deadband} with patch_cap {self.patch_cap}")
        prune_spec.check(self.prune, self.importance, self.ranking, self.distill, self.prune_steps)
        make_aggregator(self.aggregator, {}, self.clip_norm)  # a bad spec fails here, before any work
        make_strategy(self.server_opt, self.server_lr, self.server_momentum)

    @classmethod
    def for_scheme(cls, scheme: str, **overrides) -> "FederatedConfig":
        if scheme not in SCHEMES:
            raise PqsuError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
        return cls(**{**SCHEMES[scheme], **overrides})

    def check_model_and_data(self) -> None:
        """A one-line PqsuError unless the data set loads, splits among the cloud and the clients, and
        `model` builds for its samples and classes: what `pqsu simulate`, `pqsu cloud` and `pqsu run`
        check before any work (shards, agents, round 0)."""
        from pqsu.export.datasets import load_dataset  # numpy: not needed to build a parser
        from pqsu.export.model_check import check_model  # torch: only when a run really starts
        from pqsu.export.partition import federated_split

        train = load_dataset(self.dataset, "train", self.data_root)
        if self.proxy_samples + self.clients > len(train):
            raise PqsuError(f"{self.dataset} has {len(train)} training samples: the cloud's {self.proxy_samples} "
                            f"(--proxy-samples) leave {max(len(train) - self.proxy_samples, 0)} for {self.clients} "
                            "clients; keep fewer for the cloud")
        federated_split(train.y, self.proxy_samples, self.clients, self.partition, self.seed, self.samples_per_client)
        check_model(self.model, train.input_shape, train.num_classes, self.dataset)

    def server_config(self) -> ServerConfig:
        from pqsu.cloud.downlink import DownlinkConfig
        from pqsu.cloud.server import ServerConfig  # torch and onnx: only when a run really starts

        downlink = DownlinkConfig(policy=self.downlink, keyframe_every=self.keyframe_every,
                                  keyframe_clip=self.keyframe_clip, patch_cap=self.patch_cap,
                                  deadband=self.patch_deadband, patch_bases=self.patch_bases, headroom=self.keyframe_headroom,
                                  saturate=self.patch_saturate)
        return ServerConfig(aggregator=self.aggregator, clip_norm=self.clip_norm, server_lr=self.server_lr,
                            server_momentum=self.server_momentum, server_opt=self.server_opt,
                            precision=self.precision, epochs=self.epochs,
                            batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                            local_prox=self.local_prox, seed=self.seed,
                            downlink=downlink)

    def prepare_config(self) -> PrepareConfig:
        from pqsu.cloud.prepare import PrepareConfig  # torch: only when a run really starts

        return PrepareConfig(self.model, self.prune, self.pretrain_epochs, self.finetune_epochs,
                             self.batch_size, 0.01, self.seed, importance=self.importance, ranking=self.ranking,
                             distill=self.distill, prune_steps=self.prune_steps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def scheme_of(config: dict) -> str:
    """The scheme whose preset a config's values (a run's config.json) follow; "custom" for none."""
    for name, preset in SCHEMES.items():
        if all(config.get(k, FIELD_DEFAULTS.get(k)) == v for k, v in preset.items()):
            return name
    return "custom"


FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FederatedConfig)}


# -- type checks (a settings file's values and programmatic configs alike) -------------------
@functools.cache
def field_types() -> dict[str, object]:
    """FederatedConfig's field name -> its annotation, evaluated (the module has string annotations)."""
    return typing.get_type_hints(FederatedConfig)


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_type(name: str, value: object, kind: object) -> None:
    """Raise a one-line PqsuError naming `name`, `value` and the expected type unless `value` fits `kind`."""
    kinds = typing.get_args(kind) or (kind,)
    if value is None and type(None) in kinds:
        return
    if not any(_fits(value, k) for k in kinds):
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds if k in _KIND_NAMES)
        raise PqsuError(f"{name} = {json.dumps(value, default=str)}: expected {wanted}")


def _fits(value: object, kind: object) -> bool:
    if kind is bool or isinstance(value, bool):  # True is an int to Python, not a number of rounds
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral)  # numpy integers too
    if kind is float:
        return isinstance(value, numbers.Real)
    return kind is str and isinstance(value, str)


# -- command line (shared by `pqsu simulate`, `pqsu cloud` and `pqsu run`) --------------------
def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per FederatedConfig field, plus --scheme and --config."""
    p.add_argument("--config", metavar="FILE", help="settings file (TOML or JSON) with any of the options below, "
                   "named with underscores; flags given on the command line win")
    p.add_argument("--scheme", choices=list(SCHEMES), default=None,
                   help="preset: fedavg (dense fp32 FedAvg), paper (FL-PQSU as published) or ours (pruned int8 "
                        "model, top-k int8 uploads with error feedback; the default); the flags below override it")
    for f in dataclasses.fields(FederatedConfig):
        kind = field_types()[f.name]
        base = next((t for t in (bool, int, float, str) if t is kind or t in typing.get_args(kind)), str)
        args = typing.get_args(kind)
        parse = _boolean if base is bool else _optional(
            _number_or_text if str in args else _int_or_float if float in args and int in args else base)
        metavar, text = FIELD_HELP[f.name]
        p.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None, metavar=metavar,
                       help=f"{text}{_defaults(f.name, f.default)}")


def _defaults(name: str, default: object) -> str:
    """' (default: X; fedavg: Y)': ours' value, then each other preset's where it differs."""
    ours = SCHEMES["ours"].get(name, default)
    others = [f"{scheme}: {_shown(preset.get(name, default))}" for scheme, preset in SCHEMES.items()
              if scheme != "ours" and preset.get(name, default) != ours]
    if ours is None and not others:
        return ""  # the help text says what leaving it unset means
    return f" (default: {'; '.join([_shown(ours)] + others)})"


def _shown(value: object) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# (metavar, what the flag does) per FederatedConfig field. No "%" here: argparse formats help with it.
FIELD_HELP: dict[str, tuple[str, str]] = {
    "model": ("NAME", "model architecture: from the zoo (cnn, alexnet, vgg16, resnet18 for images, cnn1d for "
                      "sensor windows), or your own nn.Module as package.module:factory (importable here; pqsu run "
                      "lets its agents rebuild it)"),
    "dataset": ("NAME", "data set: fashion-mnist, mnist, cifar10, italy-power, basic-motions, or a labelled-array "
                        ".npz file (x, y)"),
    "data_root": ("DIR", "folder with the data set files (default: the data set's standard place)"),
    "clients": ("N", "number of devices the training data is split among"),
    "partition": ("SPEC", "how the devices' data is split: iid, dirichlet[:ALPHA] (label skew, stronger as ALPHA "
                  "shrinks) or shards[:K] (K label-sorted shards per device)"),
    "fraction": ("F", "fraction of the devices asked to train each round, in (0, 1]"),
    "rounds": ("N", "federated rounds to run"),
    "proxy_samples": ("N", "training samples the cloud keeps for round 0's pre-training and pruning, disjoint "
                      "from the devices' data"),
    "samples_per_client": ("N", "at most this many training samples per device (default: all of its share)"),
    "pretrain_epochs": ("EPOCHS", "round 0: epochs the cloud pre-trains the model on its proxy samples"),
    "finetune_epochs": ("EPOCHS", "round 0: epochs of fine-tuning on the proxy samples after pruning"),
    "prune": ("RATIO", "round 0: fraction of channels removed from every prunable layer, in (0, 1); auto:PT "
              "for the largest ratio whose fine-tuned accuracy on held-out proxy data stays within PT points of "
              "the unpruned model (the choice is in config.json as prune_chosen); none keeps the model unpruned"),
    "importance": ("NAME", "round 0: which channels pruning removes: l1 (weight magnitude, the paper's), l2, "
                   "taylor (loss change estimated from gradients on the proxy data), bn-scale (BatchNorm scale, "
                   "l1 where a layer has none) or random"),
    "ranking": ("NAME", "round 0: uniform (every layer loses the same fraction) or global (least important "
                "channels model-wide, at uniform's parameter count)"),
    "distill": ("W", "round 0: weight in [0, 1) of the unpruned model's soft targets in the fine-tune loss "
                "(knowledge distillation); 0 trains on the labels alone"),
    "prune_steps": ("K", "round 0: prune in K steps with a fine-tune after each, the fine-tune epochs split "
                    "between them"),
    "precision": ("int8|fp32", "the model sent to the devices each round: int8 or fp32 ONNX"),
    "upload": ("RULES", "when a device uploads: always, loss (its loss improved since its last upload), norm:T "
               "(update norm relative to the weights above T) or relevance:T (sign agreement with the last "
               "global update at least T); join rules with +"),
    "select": ("SPEC", "which entries an upload carries: topk:F (the largest fraction F of each tensor), "
               "tcs:F[:L] (time-correlated top-k: as many entries, a share L (default 0.25) of them the "
               "largest anywhere, the rest the largest among those the last model change touched), "
               "threshold:T (entries with |value| >= T), dense (every entry, int8) or fp32 (every entry, float32)"),
    "error_feedback": ("BOOL", "true: a device keeps what it did not send (unselected entries, rounding, skipped "
                       "rounds) and adds it to its next update"),
    "epochs": ("EPOCHS", "local training epochs on each device per round"),
    "batch_size": ("N", "mini-batch size of the devices' training and of the cloud's round-0 training"),
    "lr": ("LR", "learning rate of the devices' local SGD"),
    "momentum": ("M", "momentum of the devices' local SGD"),
    "local_prox": ("MU", "FedProx: the devices add mu/2 ||w - w_received||^2 to their local loss, which holds "
                   "non-IID devices' updates near the global model (sent in every round task; 0 turns it off; "
                   "try 0.01 to 1)"),
    # Against poisoning (an enrolled device sending scaled or sign-flipped updates): docs/reliability.md.
    "aggregator": ("SPEC", "how the round's updates are combined: fedavg, median or trimmed:F (per coordinate, "
                   "drop the largest and smallest fraction F). Against poisoning use median or trimmed:0.1 "
                   "together with --clip-norm median; both reduce each entry over the devices that sent it and "
                   "hold the round's updates in memory"),
    "clip_norm": ("NORM", "bound every update's L2 norm: a number, or median[:F] for F times the median norm of "
                  "the round's updates (follows the honest majority as updates shrink). Against poisoning: "
                  "median, which caps a scaled-up update at a typical one's size (default: no bound)"),
    "server_lr": ("LR", "server learning rate: the step the cloud takes along the combined update"),
    "server_momentum": ("M", "server momentum (FedAvgM) on the combined update; 0 is plain FedAvg"),
    "server_opt": ("NAME", "server strategy: fedavgm (server lr and momentum above), fedadam[:TAU] or fedyogi[:TAU] "
                   "(adaptive per-coordinate steps on the combined update; use a server lr near 0.01)"),
    "eval_samples": ("N", "test samples the cloud evaluates each round's model on (default: the whole test split)"),
    "seed": ("N", "random seed of the data split, the devices asked each round and the training"),
    "downlink": ("POLICY", "how the model reaches devices after the first round: full (the whole int8 file "
                 "every round: patches off), hard (patches from the model a device holds; a full keyframe on "
                 "drift) or soft (patches; on drift only the clipping channels' scales are widened, itself a "
                 "patch)"),
    "keyframe_every": ("N", "a full keyframe (fresh export and calibration) every N model versions (default: "
                       "only the first)"),
    "keyframe_clip": ("F", "drift threshold: act (hard: full keyframe, soft: widen scales) when more than this "
                      "fraction of the int8 weights clip at the held scales; none: never"),
    "patch_cap": ("CAP", "largest patch from the previous version, in bytes (5800) or as a fraction of the int8 "
                  "model file (0.05, which scales with the model): the largest weight changes first, the rest "
                  "stays in the master for later rounds; none: exact patches"),
    "patch_deadband": ("STEPS", "an int8 weight the devices hold changes only when the master is more than this "
                       "many steps away from it (0.5: whenever it rounds to another value, exact patches); "
                       "larger values stop weights near a rounding boundary from flipping back and forth"),
    "patch_bases": ("N", "patches are retained from this many earlier versions; a device further behind "
                    "downloads the full model"),
    "patch_saturate": ("BOOL", "true: between keyframes, clip the master's weights to the held int8 scales, as "
                       "devices see them, so updates cannot push the master's copy of a clipped weight further out "
                       "unseen (a later keyframe would ship the overshoot); the keyframe drift counts the weights "
                       "pressed past the scales"),
    "keyframe_headroom": ("H", "at a keyframe, widen the int8 weight scales by H so the model can grow "
                          "before it clips (coarser steps by the same factor)"),
}


def config_from_args(args: argparse.Namespace) -> FederatedConfig:
    """Scheme preset, then the settings file, then command-line flags; a wrong type in the file is one
    line naming the file, the key, the value and the expected type, before any work."""
    path = getattr(args, "config", None)
    settings = read_settings(path) if path else {}
    scheme = args.scheme or settings.pop("scheme", "ours")
    if not isinstance(scheme, str):
        raise PqsuError(f"settings file {path}: scheme = {json.dumps(scheme, default=str)}: expected a string")
    hints = field_types()
    values = {k: v for k, v in settings.items() if k in hints}
    for name, value in values.items():
        try:
            check_type(name, value, hints[name])
        except PqsuError as exc:
            raise PqsuError(f"settings file {path}: {exc}") from None
    if values and scheme in SCHEMES:  # a value of the right type that means nothing (prune = "half",
        try:                           # local_prox = -1) names the file too: the file's values alone, checked
            FederatedConfig.for_scheme(scheme, **values)
        except PqsuError as exc:
            raise PqsuError(f"settings file {path}: {exc}") from None
    given = {n: getattr(args, n) for n in hints if getattr(args, n, None) is not None}
    values.update({n: None if v is NONE_GIVEN else v for n, v in given.items()})
    others = {k: v for k, v in settings.items() if k not in hints}
    if others:
        apply_command_settings(others, args, path)
    return FederatedConfig.for_scheme(scheme, **values)


def apply_command_settings(settings: dict, args: argparse.Namespace, path) -> None:
    """The file's keys that are the command's own options (`broker = ...` for `pqsu cloud`) set them where the
    command line left the default; a key the command does not have, or a value of the wrong type, is one line.

    A flag given with its default value counts as not given: argparse keeps no record of which flags were typed."""
    parser = getattr(args, "_parser", None)
    actions = {a.dest: a for a in parser._actions} if parser is not None else {}  # noqa: SLF001 (argparse has no public list)
    for key, value in settings.items():
        action = actions.get(key)
        if action is None or key in ("help", "config") or key.startswith("_"):
            known = sorted(d for d in actions if d not in ("help", "config") and not d.startswith("_"))
            raise PqsuError(f"settings file {path}: unknown key {key!r}" + (f"; known keys: {', '.join(known)}" if known else ""))
        value = _command_value(action, value, f"settings file {path}: {key} = {json.dumps(value, default=str)}")
        if getattr(args, key, None) == action.default:
            setattr(args, key, value)


def _command_value(action: argparse.Action, value: object, where: str) -> object:
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise PqsuError(f"{where}: expected true or false")
        return value
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise PqsuError(f"{where}: expected {'an integer' if action.type is int else 'a number' if action.type is float else 'a string'}")
    if action.type is int and not isinstance(value, int):
        raise PqsuError(f"{where}: expected an integer")
    if action.type is float:
        if not isinstance(value, (int, float)):
            raise PqsuError(f"{where}: expected a number")
        value = float(value)
    elif action.type is not int:
        if isinstance(value, (int, float)) and action.choices is not None:
            value = str(value)  # protocol = 5 in TOML means "5"
        if not isinstance(value, str):
            raise PqsuError(f"{where}: expected a string")
        if action.type is not None:
            try:
                value = action.type(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                raise PqsuError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        raise PqsuError(f"{where}: expected one of {', '.join(map(str, action.choices))}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_or_float(text: str) -> int | float:
    """5800 is a count, 0.05 a fraction: the type the text has, not the wider one."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _number_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


class _NoneGiven:
    """`--prune none` typed on the command line: None, but given (an untyped flag is None too)."""

    def __repr__(self) -> str:
        return "none"


NONE_GIVEN = _NoneGiven()


def _optional(kind: type):
    def parse(text: str):
        return NONE_GIVEN if text.lower() == "none" else kind(text)
    parse.__name__ = "number" if kind is _int_or_float else kind.__name__  # argparse: "invalid number value"
    return parse
