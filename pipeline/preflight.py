"""Checks before any work: unreachable services and unwritable places fail in seconds, in one line
naming the URI or path, instead of after Ray has started or a whole study has trained."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """A place the stage needs is unreachable or unwritable; the message names it."""


def writable_dir(path: Path, label: str) -> None:
    """`path` is (or can be created as) a folder we may write in; creates nothing."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"is under the file {probe}"
        raise PreflightError(f"{label}: {path} {where}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise PreflightError(f"{label}: {probe} is not writable ({e.strerror or e})") from e


def reachable_storage(location: str, label: str) -> None:
    """A local folder we may write in, or a URI whose bucket answers (read-only probe)."""
    from pipeline.storage import Store, is_uri

    if not is_uri(location):
        writable_dir(Path(location), label)
        return
    try:
        store = Store.at(location)
        bucket = store.path.split("/", 1)[0]
        found = store.fs.get_file_info(bucket)
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError/ArrowInvalid/... by backend
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PreflightError(f"{label}: {location} is not reachable storage ({msg})") from e
    import pyarrow.fs as pafs

    if found.type != pafs.FileType.Directory:
        raise PreflightError(f"{label}: {location}: no bucket {bucket!r} there (create it first)")


def _tcp(host: str, port: int, label: str, value: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            pass
    except OSError as e:
        raise PreflightError(f"{label}={value}: cannot connect to {host}:{port} ({e.strerror or e})") from e


def check_tracking_uri(uri: str, label: str | None = None) -> None:
    """The MLflow store answers (HTTP: its /health endpoint) or its file can be written."""
    import requests

    label = label or ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "paths.mlflow_uri")
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if db.exists() and not db.is_file():
            raise PreflightError(f"{label}={uri}: {db} is not a file")
        writable_dir(db.parent, f"{label}={uri}")
    elif scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            r = requests.get(url, timeout=TIMEOUT_S)
        except requests.RequestException as e:
            raise PreflightError(
                f"{label}={uri}: the MLflow server does not answer ({type(e).__name__})"
            ) from None
        if r.status_code not in (200, 401, 403):
            raise PreflightError(f"{label}={uri}: not an MLflow server (HTTP {r.status_code} from {url})")
    elif scheme in ("", "file"):
        writable_dir(Path(parts.path if scheme else uri), f"{label}={uri}")
    elif scheme in ("postgresql", "mysql", "mssql"):
        default = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}[scheme]
        try:
            port = parts.port or default
        except ValueError:
            raise PreflightError(f"{label}={uri}: bad port") from None
        _tcp(parts.hostname or "localhost", port, label, uri)
    elif scheme not in ("databricks", "databricks-uc", "uc"):
        raise PreflightError(
            f"{label}={uri}: unknown scheme {parts.scheme!r} "
            "(expected sqlite:///, http(s)://, file:, postgresql://, mysql://, mssql:// or databricks)"
        )


def check_ray_address() -> None:
    """RAY_ADDRESS (when set) has something listening: ray.init would otherwise wait for ever."""
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    if not addr or addr in ("auto", "local"):
        return
    hostport = addr.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"RAY_ADDRESS={addr}: expected host:port, ray://host:port, auto or local")
    _tcp(host.strip("[]"), int(port), "RAY_ADDRESS", addr)
    if not _speaks_grpc(host.strip("[]"), int(port)):  # ray.init would retry such a port for ever too
        raise PreflightError(f"RAY_ADDRESS={addr}: {hostport} answers, but not as a Ray cluster (no gRPC)")


def _speaks_grpc(host: str, port: int) -> bool:
    """Ray's GCS and client server are gRPC: an HTTP/2 server answers the client preface with a
    SETTINGS frame (type 4); an HTTP/1 server, SSH or anything else does not."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
            s.settimeout(TIMEOUT_S)
            s.sendall(preface)
            head = b""
            while len(head) < 9:
                chunk = s.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except OSError:
        return False
    return len(head) == 9 and head[3] == 4


def check_before_work(params: Any, uri: str, runs_dir: Path, paths: Any) -> None:
    """Everything a training stage writes to or talks to, checked before Ray starts."""
    writable_dir(runs_dir, "paths.results")
    reachable_storage(paths.ray_results, "paths.ray_results")
    if not uri.startswith(("http://", "https://")):
        writable_dir(paths.artifacts, "paths.mlflow_artifacts")
    check_tracking_uri(uri)
    check_ray_address()
