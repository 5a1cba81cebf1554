"""DVC stage `train@<study>`: one Ray Tune experiment per study (see pipeline.orchestrate)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
