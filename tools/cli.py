"""`pqsu`: one console script, one subcommand per entry point.

Subcommand modules are imported only when chosen, so `pqsu edge` on a board never
imports torch-pruning or matplotlib, and `pqsu --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pqsu.protocol.errors import PqsuError

# onnxruntime (1.32) otherwise writes a device id and an event store under $HOME/.cache at import: boards
# are offline and often have a read-only home. Set before any subcommand imports it; a user's value wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# name -> (module exposing add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("pqsu.export.command", "prune a model, export it to ONNX, quantize to int8, report"),
    "run": ("pqsu.tools.fleet.run", "the one-machine fleet: broker, coordinator and N agents; the main job"),
    "cloud": ("pqsu.cloud.command", "run the coordinator: rounds through an MQTT broker"),
    "aggregator": ("pqsu.cloud.aggregator_command", "run an aggregator worker: fold some partitions' updates for the coordinator"),
    "edge": ("pqsu.edge.command", "run an edge agent on a board"),
    "simulate": ("pqsu.tools.fleet.simulate", "federated training in one process (no broker): the round logic, measured"),
    "bench": ("pqsu.tools.bench.command", "run the measured benchmarks and print the ratios"),
    "reliability": ("pqsu.tools.reliability.command", "measure security and fault tolerance against real processes"),
    "flash": ("pqsu.tools.flash.command", "build an agent bundle for a board (rpi4, rpi5, jetson-orin...) and install it"),
    "dashboard": ("pqsu.tools.dashboard.command", "a live, read-only web page of a fleet, fed from its MQTT messages"),
    "report": ("pqsu.tools.report.command", "one self-contained HTML file of a finished run (tables and plots), to share"),
}


class SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser reports arguments it does not know itself, with its own usage.

    argparse hands a subparser's leftovers up to the top parser, which then prints `usage: pqsu
    [-h] ...` for `pqsu run --bogus`: no help for someone who mistyped a flag of `run`. Nested
    subcommands (`pqsu edge run`) inherit this class, so the innermost one reports."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqsu",
        description="fl-pqsu: federated learning for small boards with structured Pruning, "
        "int8 Quantization and Selective Updating.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubcommandParser)
    sub.required = True
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name != chosen:  # only the chosen command's module is imported (a board may lack torch)
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        sp = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
        sp.set_defaults(_module=module, _parser=sp)  # settings files are checked against the parser's options
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    # Our progress at INFO; third-party libraries (the ONNX exporter is chatty) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("pqsu").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args._module.run(args) or 0)
    except PqsuError as exc:
        print(f"pqsu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pqsu {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
