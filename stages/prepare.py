"""DVC stage `prepare@<dataset>`: see pipeline.cli.cmd_prepare."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
