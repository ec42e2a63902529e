"""`python -m bench scramble [--batch 64 --size 512 --grid 8 --repeats 5]`
`python -m bench train [--models toy,sd15 --steps-toy 20 --steps-sd15 N --json PATH]`
`python -m bench gpu [--out PATH] [--tiny --device cpu] [--prepare DIR]`
`python -m bench canvas --out DIR [--erase 10,50,100] [--styles 8] [--set KEY=VALUE]`
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench import canvas, gpu, scramble, train

# name -> module with add_arguments(parser) and run(args) -> int
BENCHMARKS = {"scramble": scramble, "train": train, "gpu": gpu, "canvas": canvas}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="dt-lora benchmarks")
    subparsers = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module in BENCHMARKS.items():
        sub = subparsers.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
