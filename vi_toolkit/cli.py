"""Command line: ``vi-toolkit COMMAND`` (also ``python -m vi_toolkit``)."""

import argparse
import sys


def _demo(args):
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, device=args.device, quick=args.quick)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="vi-toolkit",
        description="Variational inference for latent variable models on Pyro and PyTorch.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="fit models with known posteriors and run the examples in quick mode",
        description="Fit models whose posteriors are known in closed form and print both side "
                    "by side, then run the example scripts with --quick.")
    demo.add_argument("--quick", action="store_true", help="short fits (seconds)")
    demo.add_argument("--out", default="out/demo", help="folder for figures and metrics.json")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        args.run(args)
    except ValueError as err:  # bad input: one clear line, not a traceback
        print(f"vi-toolkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
