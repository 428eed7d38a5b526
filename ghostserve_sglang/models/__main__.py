"""``python -m ghostserve_sglang.models [NAME ...]``: generate the bundled models (all by default) and
print each one's folder, for ``--model-path``. ``--write-sums`` records new digests after a deliberate
change to the generator."""

import argparse
import sys

from . import HERE, NAMES, build, check_name, path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ghostserve_sglang.models", description=__doc__)
    parser.add_argument("names", nargs="*", default=list(NAMES), metavar="NAME",
                        help=f"one of: {', '.join(NAMES)}")
    parser.add_argument("--write-sums", action="store_true")
    args = parser.parse_args()
    for name in args.names:
        try:
            check_name(name)
        except ValueError as exc:
            parser.error(str(exc))
        if args.write_sums:
            build.build(HERE / name, HERE / name, check=False)
            build.write_sums(HERE / name)
        print(path(name))


if __name__ == "__main__":
    sys.exit(main())
