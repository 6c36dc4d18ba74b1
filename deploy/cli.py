"""`lance-serve` command line.

Each command is a (name, help, configure) entry of `COMMANDS`; `configure(parser)` adds the command's
arguments and `parser.set_defaults(run=handler)`, where `handler(args) -> int | None`. Only the
chosen command is configured, so a command that needs the model core (and torch) costs nothing to
the others, and `lance-serve --help` lists every command without importing any of them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import checkpoint_cli, k8s_cli


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]


COMMANDS = (
    Command("k8s", "KubeRay RayService manifests: render from a stage graph, check offline", k8s_cli.configure),
    Command("make-tiny-checkpoint", "write a random-weight Lance checkpoint in the real layout",
            checkpoint_cli.configure_make_tiny_checkpoint),
    Command("check-checkpoint", "account for every tensor of a checkpoint (headers only, no weights read)",
            checkpoint_cli.configure_check_checkpoint),
)


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command named in argv: its first word that is not an option (the top-level options
    take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for `argv`: every command listed, the one argv chooses configured."""
    chosen = chosen_command(argv)
    parser = argparse.ArgumentParser(prog="lance-serve", description="Lance serving tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.help,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if command.name == chosen:
            command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"lance-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
