"""`lance-serve` command line: a registry of subcommands.

To add a command, write a module with a function that configures its argparse parser (arguments and
`parser.set_defaults(run=handler)`, where `handler(args) -> int | None`), decorate it with
`@subcommand("name", help=...)`, and list the module in `COMMAND_MODULES`. A command with its own
sub-commands (e.g. `k8s render`) adds nested subparsers inside its configure function. Handlers import
heavy libraries themselves, so `lance-serve --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

# Modules whose import registers subcommands (this one registers make-tiny-checkpoint itself).
COMMAND_MODULES: tuple[str, ...] = ("serve_app.k8s_cli",)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(name: str, help: str):
    """Register `configure(parser)` as the subcommand `name`."""
    def register(configure: Callable[[argparse.ArgumentParser], None]):
        if name in SUBCOMMANDS:
            raise ValueError(f"lance-serve subcommand {name!r} is registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, configure)
        return configure
    return register


def build_parser() -> argparse.ArgumentParser:
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="lance-serve", description="Lance serving tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND")
    for command in SUBCOMMANDS.values():
        command.configure(commands.add_parser(command.name, help=command.help, description=command.help,
                                              formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"lance-serve {args.command}: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------------
# make-tiny-checkpoint
# ----------------------------------------------------------------------------------------------------
@subcommand("make-tiny-checkpoint", help="write a random-weight Lance checkpoint in the real layout")
def _configure_make_tiny_checkpoint(parser: argparse.ArgumentParser) -> None:
    from .tiny import DEFAULT_SEED, TinyCheckpointSpec  # light: no torch-heavy work at import

    d = TinyCheckpointSpec()
    parser.add_argument("dir", help="output folder (created; its checkpoint files are overwritten)")
    llm = parser.add_argument_group("LLM (head_dim = hidden / heads must be 64, 80, 112 or 128)")
    llm.add_argument("--layers", type=int, default=d.layers)
    llm.add_argument("--hidden", type=int, default=d.hidden)
    llm.add_argument("--heads", type=int, default=d.heads, help="query heads")
    llm.add_argument("--kv-heads", type=int, default=d.kv_heads)
    llm.add_argument("--intermediate", type=int, default=d.intermediate)
    llm.add_argument("--vocab-size", type=int, default=d.vocab_size, help="embedding rows (>= 998 tokens)")
    vit = parser.add_argument_group("ViT")
    vit.add_argument("--vit-depth", type=int, default=d.vit_depth)
    vit.add_argument("--vit-hidden", type=int, default=d.vit_hidden)
    vit.add_argument("--vit-heads", type=int, default=d.vit_heads)
    vit.add_argument("--vit-intermediate", type=int, default=d.vit_intermediate)
    vae = parser.add_argument_group("VAE (Wan2.2 structure)")
    vae.add_argument("--vae-dim", type=int, default=d.vae_dim, help="encoder base width")
    vae.add_argument("--vae-decoder-dim", type=int, default=d.vae_decoder_dim, help="decoder base width")
    parser.add_argument("--variant", action="append", choices=("Lance_3B", "Lance_3B_Video"), dest="variants",
                        help="variant folder(s) to write (repeatable; default Lance_3B)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"base seed (default {DEFAULT_SEED} reproduces the golden tiny checkpoint)")
    parser.set_defaults(run=_run_make_tiny_checkpoint)


def _run_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from .tiny import TinyCheckpointSpec, make_tiny_checkpoint

    spec = TinyCheckpointSpec(
        layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads,
        intermediate=args.intermediate, vocab_size=args.vocab_size, vit_depth=args.vit_depth,
        vit_hidden=args.vit_hidden, vit_heads=args.vit_heads, vit_intermediate=args.vit_intermediate,
        vae_dim=args.vae_dim, vae_decoder_dim=args.vae_decoder_dim, seed=args.seed,
        variants=tuple(dict.fromkeys(args.variants or ("Lance_3B",))),
    )
    files = make_tiny_checkpoint(args.dir, spec)
    print(files.root)
    return 0


# ----------------------------------------------------------------------------------------------------
# check-checkpoint
# ----------------------------------------------------------------------------------------------------
@subcommand("check-checkpoint", help="account for every tensor of a checkpoint (headers only, no weights read)")
def _configure_check_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint folder, variant folder, or hub repo id (downloads the variant)")
    parser.add_argument("--variant", choices=("Lance_3B", "Lance_3B_Video"), default=None,
                        help="variant to check (default: Lance_3B, or the variant folder given)")
    parser.set_defaults(run=_run_check_checkpoint)


def _run_check_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import check_checkpoint, resolve_checkpoint

    files = resolve_checkpoint(args.path, args.variant)
    report = check_checkpoint(files, raise_on_error=False)
    print(report)
    return 0 if report.ok else 1


if __name__ == "__main__":
    # Run the registry of the importable module, which command modules register into (not __main__'s copy).
    from stages.lance.cli import main as _main

    sys.exit(_main())
