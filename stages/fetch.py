"""DVC stage `fetch@<dataset>`: see pipeline.cli.cmd_fetch."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["fetch", *sys.argv[1:]]))
