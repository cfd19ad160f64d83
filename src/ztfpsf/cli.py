"""The ``ztfpsf`` command: a thin layer that parses arguments and calls the library.

Each subcommand lives in ``ztfpsf.commands.<name>`` with ``HELP``, ``add_arguments(parser)``
and ``run(args) -> int``. Errors meant for the user are raised as :class:`UserError` and
printed as one line (exit code 2), never as a traceback.
"""

import argparse
import importlib
import logging
import sys

from . import __version__
from ._jax import configure

COMMANDS = ("demo", "simulate", "fit", "photometry", "catalog", "alert", "plot", "report")


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _available():
    for name in COMMANDS:
        try:
            yield name, importlib.import_module(f"ztfpsf.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"ztfpsf.commands.{name}":
                raise


def build_parser():
    parser = argparse.ArgumentParser(prog="ztfpsf", description="Fast batched PSF fitting for ZTF and other survey images.")
    parser.add_argument("--version", action="version", version=f"ztfpsf {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("jax").setLevel(max(level, logging.WARNING))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    configure()  # the command owns its process: float64, all cores, compilation cache
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"ztfpsf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
