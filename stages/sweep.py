"""DVC stage `sweep@<name>`: Ray Tune over CPLG's r x tau_low (see pipeline.sweep)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
