"""DVC stage `pretrain`: warm-start backbones on disjoint synthetic images (see pipeline.pretrain)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
