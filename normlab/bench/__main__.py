"""``python -m normlab.bench`` — the same as ``normlab bench`` (an entry point: it belongs to the command line)."""

import argparse

from normlab.cli.bench import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m normlab.bench",
                                     description="benchmark the kernels against torch and copy_ bandwidth")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
