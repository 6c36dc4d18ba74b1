"""`lance-serve make-tiny-checkpoint` and `lance-serve check-checkpoint`: the model core's own tools.

They import the model core (stages.lance, and with it torch) inside the command, when it is chosen.
"""
from __future__ import annotations

import argparse


def configure_make_tiny_checkpoint(parser: argparse.ArgumentParser) -> None:
    from stages.lance.checkpoint import VARIANTS
    from stages.lance.tiny import DEFAULT_SEED, TinyCheckpointSpec

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
    parser.add_argument("--variant", action="append", choices=VARIANTS, dest="variants",
                        help="variant folder(s) to write (repeatable; default Lance_3B)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"base seed (default {DEFAULT_SEED} reproduces the golden tiny checkpoint)")
    parser.set_defaults(run=_run_make_tiny_checkpoint)


def _run_make_tiny_checkpoint(args: argparse.Namespace) -> int:
    from stages.lance.tiny import TinyCheckpointSpec, make_tiny_checkpoint

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


def configure_check_checkpoint(parser: argparse.ArgumentParser) -> None:
    from stages.lance.checkpoint import VARIANTS

    parser.add_argument("path", help="checkpoint folder, variant folder, or hub repo id (downloads the variant)")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="variant to check (default: Lance_3B, or the variant folder given)")
    parser.set_defaults(run=_run_check_checkpoint)


def _run_check_checkpoint(args: argparse.Namespace) -> int:
    from stages.lance.checkpoint import check_checkpoint, resolve_checkpoint

    files = resolve_checkpoint(args.path, args.variant)
    report = check_checkpoint(files, raise_on_error=False)
    print(report)
    return 0 if report.ok else 1
