"""`python -m tokenspeed.sim TRACE ...` (the same as `tokenspeed sim`)."""

import argparse
import sys

from tokenspeed.sim.cli import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tokenspeed.sim", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
