"""Data-layer errors: each message names the file (or key) and what was expected."""


class DataError(Exception):
    """Bad or missing input data; the stage exits non-zero and earlier outputs stay intact."""
