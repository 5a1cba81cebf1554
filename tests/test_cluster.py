"""A study on a real cluster: Tune storage on an S3 server (no shared filesystem), a worker node
lost mid-trial, and a local cluster closed to the network.

The S3 server is moto's, started on 127.0.0.1 by the test; the nodes are Ray's own
(`ray.cluster_utils.Cluster`), several raylets on this machine with token authentication on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.test_e2e_dvc import tiny_params
from tests.test_orchestrate import _env, _prepare

pytestmark = pytest.mark.slow

BUCKET = "dssn-runs"


@pytest.fixture
def s3(monkeypatch):
    """A real S3-compatible server on 127.0.0.1 with one bucket; the AWS environment points at it
    the documented way (credentials + AWS_ENDPOINT_URL), for this process and its children."""
    import logging

    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def _keys(client, prefix: str = "") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _recipe() -> str:
    """The README's cluster recipe, the bash block between its markers."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- cluster-recipe:start", 1)[1].split("<!-- cluster-recipe:end -->", 1)[0]
    return block.split("```bash\n", 1)[1].split("```", 1)[0]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_under(marker: str) -> None:
    """SIGKILL every process whose command line mentions `marker` (this test's Ray session dir):
    the recipe's `ray stop` would stop every Ray process of the machine, other tests' included."""

    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def test_readme_cluster_recipe_on_s3_storage_with_token_auth(tmp_path, s3):
    """The README's recipe, run as it stands on this machine (a head and a worker raylet, an
    MLflow server, S3 storage on a server of the test's own): checkpoints, weights and the driver's
    bookkeeping go to the bucket; the driver writes the result files from the trials' reports and
    nothing goes to a local ray_results; the token is in no output and no Ray log; a node without
    it is refused."""
    import tempfile

    from tests.test_e2e_dvc import copy_repo, env

    work = copy_repo(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()))
    params["paths"]["ray_results"] = f"s3://{BUCKET}/ray_results"
    params["ray"].update(num_cpus=None, cpus_per_trial=0.5)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ray_port, mlflow_port = _free_port(), _free_port()
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit
    e = {
        **env(work),
        "HOME": str(tmp_path / "home"),
        "RAY_TMPDIR": ray_tmp,
        "HEAD_IP": "127.0.0.1",
        "NODE_IP": "127.0.0.1",
        "MLFLOW_HOST": "127.0.0.1",
    }
    mlflow = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
        ],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its server workers are children: stopped as a group
    )
    script = _recipe().replace(":6379", f":{ray_port}").replace("--port=6379", f"--port={ray_port}")
    script = script.replace(":5000", f":{mlflow_port}")
    try:
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 60)
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=work,
            env=e,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        token = (tmp_path / "home/.ray/dssn_auth_token").read_text().strip()
        assert len(token) == 64 and (tmp_path / "home/.ray/dssn_auth_token").stat().st_mode & 0o077 == 0
        refused = subprocess.run(  # a node without the token cannot join
            [
                str(Path(sys.executable).parent / "ray"),
                "start",
                f"--address=127.0.0.1:{ray_port}",
                "--num-cpus=1",
            ],
            env={**{k: v for k, v in e.items() if k != "RAY_AUTH_TOKEN_PATH"}, "RAY_AUTH_MODE": "token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()
        logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
        leaked = [str(p) for p in logs if token.encode() in p.read_bytes()]
        assert token not in out.stdout + out.stderr and not leaked, leaked[:3]
    finally:
        _kill_under(ray_tmp)
        os.killpg(mlflow.pid, signal.SIGKILL)
        mlflow.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    keys = _keys(s3, "ray_results/")
    cells = {k.split("/")[3] for k in keys if k.endswith("/last.pt")}
    assert len(cells) == 4, keys
    assert cells == {k.split("/")[3] for k in keys if k.endswith("/best.pt")}
    # every trial checkpointed through Tune into the bucket; its last checkpoint is its result
    assert len([k for k in keys if "/attempts/1/" in k and k.endswith("/dssn_result.json")]) == 4
    assert any(k.endswith("/mlflow_parent_run_id") for k in keys)
    assert not list(work.rglob("ray_results")), "something was written to a local ray_results"
    runs = sorted((work / "results/runs/demo").glob("*.json"))
    assert {p.stem for p in runs} == cells
    for p in runs:
        done = json.loads(p.read_text())
        want = f"s3://{BUCKET}/ray_results/{done['ray_experiment']}/cells/{p.stem}/best.pt"
        assert done["checkpoint_best"] == want
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dssn/demo")
    trials = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("role") == "trial"]
    assert len(trials) == 4 and {t.info.status for t in trials} == {"FINISHED"}
    assert all(t.data.tags["checkpoint.last"].startswith(f"s3://{BUCKET}/") for t in trials)


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > deadline:
                raise
        time.sleep(0.5)


def _loopback(address: str) -> bool:
    """`127.0.0.1:80`, `[::1]:80`, `[::ffff:127.0.0.1]:80` yes; `*:80`, `0.0.0.0:80`, `10.0.0.2:80` no."""
    import ipaddress

    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def test_loopback_addresses_as_ss_prints_them():
    assert _loopback("127.0.0.1:6379") and _loopback("[::1]:1") and _loopback("[::ffff:127.0.0.1]:45337")
    assert not any(_loopback(a) for a in ("*:6379", "0.0.0.0:1", "[::]:1", "192.0.2.2:40887"))


def test_local_cluster_listens_on_loopback_only():
    """`dvc repro` without RAY_ADDRESS: no Ray process listens on a non-loopback address."""
    code = (
        "import os, subprocess, json\n"
        "from pathlib import Path\n"
        "from pipeline.orchestrate import connect_ray\n"
        "import ray\n"
        "connect_ray(1)\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "kids = {}\n"
        "for p in Path('/proc').iterdir():\n"
        "    try:\n"
        "        kids.setdefault(int((p / 'stat').read_text().rsplit(')', 1)[1].split()[1]), []).append(int(p.name))\n"
        "    except (ValueError, OSError, IndexError):\n"
        "        pass\n"
        "mine, todo = set(), [os.getpid()]\n"
        "while todo:\n"
        "    pid = todo.pop(); mine.add(pid); todo += kids.get(pid, [])\n"
        "out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
        "print(json.dumps([ln for ln in out.splitlines() if any(f'pid={p},' in ln for p in mine)]))\n"
    )
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ray_lines = json.loads(out.stdout.strip().splitlines()[-1])  # this cluster's processes only
    assert any("gcs_server" in ln for ln in ray_lines) and any("raylet" in ln for ln in ray_lines), ray_lines
    exposed = [ln for ln in ray_lines if not _loopback(ln.split()[3])]
    assert not exposed, exposed


def test_unreachable_bucket_is_one_line_before_any_work(tmp_path, s3, capsys):
    from pipeline.cli import main

    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["paths"]["ray_results"] = "s3://no-such-bucket/ray_results"
    root = _prepare(tmp_path, params)
    os.environ["DVC_ROOT"] = str(root)
    try:
        assert main(["train", "demo"]) == 2
    finally:
        os.environ.pop("DVC_ROOT")
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: paths.ray_results: s3://no-such-bucket/ray_results: no bucket"), err
    assert not (root / "results/runs").exists() and not (root / "mlflow.db").exists()


def test_a_lost_worker_node_resumes_its_trial_elsewhere_from_its_last_checkpoint(tmp_path, s3):
    """Three raylets (a head with no CPU for trials, two 1-CPU workers), token authentication on,
    Tune storage on S3. The node running the trial is removed once the trial has reported a
    checkpoint; Tune retries the trial on the other node, which resumes from that checkpoint (not
    epoch 0), and the study ends with one MLflow run whose every epoch was logged once.

    The cluster and the driver run in their own process (tests/cluster_node_loss.py): Ray reads
    RAY_AUTH_MODE once per process, as a user's shell would set it before anything starts."""
    raw = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw["paths"]["ray_results"] = f"s3://{BUCKET}/ray_results"
    raw["paths"]["mlflow_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    demo = raw["studies"]["demo"]
    demo.update(splits=["1_4"], variants=["dssn"])
    demo["overrides"]["train"].update(epochs=8, iters_per_epoch=6)
    raw["ray"].update(num_cpus=None, cpus_per_trial=1.0, max_failures=2)
    root = _prepare(tmp_path, raw)
    env = {**_env(root), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 32}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-m", "tests.cluster_node_loss", str(root)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    (tmp_path / "node_loss.log").write_text(out.stdout + "\n=== stderr ===\n" + out.stderr)
    assert out.returncode == 0, f"see {tmp_path / 'node_loss.log'}: {out.stderr[-1500:]}"
    removed = json.loads(out.stdout.strip().splitlines()[-1])
    assert removed["removed_node"] and removed["checkpoints_before"] >= 1

    client = MlflowClient(tracking_uri=raw["paths"]["mlflow_uri"])
    exp = client.get_experiment_by_name("dssn/demo")
    trials = [
        r
        for r in client.search_runs([exp.experiment_id], max_results=100)
        if r.data.tags.get("role") == "trial"
    ]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    tags = trials[0].data.tags
    assert tags["ray.resumed_from"].startswith(f"{BUCKET}/ray_results/"), tags.get("ray.resumed_from")
    resumed_epoch = int(tags["ray.resumed_from"].rsplit("epoch ", 1)[1].rstrip(")"))
    assert resumed_epoch >= 1, "the retried trial started again from epoch 0"
    assert tags["ray.node_id"] != removed["removed_node"], "the trial was not retried on another node"
    steps = [m.step for m in client.get_metric_history(trials[0].info.run_id, "val/miou_student")]
    assert sorted(steps) == list(range(1, 9)), steps  # every epoch once: no epoch trained twice
    result = json.loads((root / "results/runs/demo" / f"{trials[0].data.tags['dssn.cell']}.json").read_text())
    assert [h["epoch"] for h in result["history"]] == list(range(1, 9))
    assert result["ray_trial_id"] == tags["ray.trial_id"]
