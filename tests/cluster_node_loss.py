"""Run the demo study of `<root>` on a three-raylet cluster and remove the node of the running
trial once it has reported a checkpoint to the S3 storage (tests/test_cluster.py drives this in a
process of its own, with RAY_AUTH_MODE=token, RAY_AUTH_TOKEN and the AWS variables set).

Prints one JSON line: the removed node and how many checkpoints the storage held at that moment.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def _trial_node(uri: str, timeout: float) -> str:
    """The node of the running trial, from its MLflow run (tag `ray.node_id`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    deadline = time.time() + timeout
    while time.time() < deadline:
        exp = client.get_experiment_by_name("dssn/demo")
        if exp is not None:
            for run in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'"):
                if run.data.tags.get("role") == "trial" and run.data.tags.get("ray.node_id"):
                    return run.data.tags["ray.node_id"]
        time.sleep(0.5)
    raise SystemExit("no trial run appeared")


def main(root: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_params
    from pipeline.orchestrate import loopback_only, run_study
    from pipeline.storage import Store

    loopback_only()
    params = load_params(root / "params.yaml")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024**2},
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    storage = Store.at(params.paths.ray_results)

    def checkpoints() -> int:
        import pyarrow.fs as pafs

        if not storage.exists():
            return 0
        infos = storage.fs.get_file_info(pafs.FileSelector(storage.path, recursive=True))
        return sum(1 for i in infos if i.path.endswith("/state.pt") and "/checkpoint_" in i.path)

    box: dict = {}

    def drive() -> None:
        try:
            box["out"] = run_study(params, "demo", root)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["err"] = e

    t = threading.Thread(target=drive)
    t.start()
    node_id = _trial_node(params.paths.mlflow_uri, 240)
    deadline = time.time() + 300
    while time.time() < deadline and checkpoints() < 1:
        time.sleep(0.1)
    n = checkpoints()
    victim = next(w for w in workers if w.node_id == node_id)
    cluster.remove_node(victim, allow_graceful=False)
    t.join(600)
    ray.shutdown()
    cluster.shutdown()
    if t.is_alive() or "err" in box:
        raise SystemExit(f"the study did not finish after the node loss: {box.get('err')!r}")
    print(json.dumps({"removed_node": node_id, "checkpoints_before": n}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
