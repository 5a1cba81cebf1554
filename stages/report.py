"""DVC stage `report`: MLflow runs -> results/tables, results/plots, results/metrics.json."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
