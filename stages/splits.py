"""DVC stage `splits@<dataset>`: see pipeline.cli.cmd_splits."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["splits", *sys.argv[1:]]))
