"""``python -m ghostserve_sglang.models [NAME ...]``: generate the bundled models (all by default) and
print each one's folder, for ``--model-path``. ``--write-sums`` records new digests after a deliberate
change to the generator."""

import argparse
import sys

from . import HERE, NAMES, build, path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ghostserve_sglang.models", description=__doc__)
    parser.add_argument("names", nargs="*", default=list(NAMES), metavar="NAME",
                        help=f"one of: {', '.join(NAMES)}")
    parser.add_argument("--write-sums", action="store_true")
    args = parser.parse_args()
    for name in args.names:
        if name not in NAMES:
            parser.error(f"model {name!r} is not bundled; bundled: {', '.join(NAMES)}")
        if args.write_sums:
            build.build(HERE / name, HERE / name, check=False)
            build.write_sums(HERE / name)
        print(path(name))


if __name__ == "__main__":
    sys.exit(main())
