"""``python -m niximage_operator``: the operator without the ``niximage`` wrapper."""

import argparse
import sys

from niximage_operator import command

parser = argparse.ArgumentParser(prog="niximage-operator", description=command.__doc__)
command.add_arguments(parser)
sys.exit(command.run(parser.parse_args()))
