"""Fault injection through the real entry points (issue 12): every bad input stops with exit 2,
one line naming the key/file/URI, no traceback, and leaves every earlier output as it was.

The config table runs in-process through `pipeline.cli.main` (the code path of `python
stages/*.py` and `dvc repro`); a representative subset also runs as real subprocesses.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import REPO

Mutate = Callable[[dict], None]


def _set(path: str, value) -> Mutate:
    """params[path] = value, with `path` dotted."""

    def mutate(raw: dict) -> None:
        *head, last = path.split(".")
        node = raw
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value

    return mutate


def _demo(**kw) -> Mutate:
    return lambda raw: raw["studies"]["demo"].update(kw)


def _sweep(**kw) -> Mutate:
    base = {"study": "demo", "split": "1_16"}
    return lambda raw: raw.update(sweeps={"s": {**base, **kw}})


def _rename_study(name: str) -> Mutate:
    return lambda raw: raw.update(studies={name: raw["studies"]["demo"]})


SYN = "datasets.synthetic"
# (case id, mutation of the repo's params.yaml, text the one-line message must contain)
CONFIG_CASES: list[tuple[str, Mutate, str]] = [
    # issue 12 defect 2: values that passed validation and failed inside the trials
    ("eval_every_0", _set("train.eval_every", 0), "train.eval_every"),
    ("eval_every_neg", _set("train.eval_every", -3), "train.eval_every"),
    ("eval_batch_0", _set("train.eval_batch", 0), "train.eval_batch"),
    ("workers_neg", _set("train.workers", -1), "train.workers"),
    ("ray_num_cpus_neg", _set("ray.num_cpus", -1), "ray.num_cpus"),
    ("ray_num_cpus_0", _set("ray.num_cpus", 0), "ray.num_cpus"),
    ("ray_max_failures_neg", _set("ray.max_failures", -1), "ray.max_failures"),
    ("log_images_neg", _set("train.log_images", -1), "train.log_images"),
    ("head_lr_mult_0", _set("train.head_lr_mult", 0), "train.head_lr_mult"),
    ("momentum_1", _set("train.momentum", 1.0), "train.momentum"),
    ("momentum_neg", _set("train.momentum", -0.5), "train.momentum"),
    ("weight_decay_neg", _set("train.weight_decay", -1e-4), "train.weight_decay"),
    ("poly_power_neg", _set("train.poly_power", -1), "train.poly_power"),
    ("lr_nan", _set("train.lr", math.nan), "train.lr"),
    ("lr_inf", _set("train.lr", math.inf), "train.lr"),
    ("aspp_rate_0", _set("model.aspp_rates", [0, 12, 18]), "model.aspp_rates"),
    ("synthetic_seed_neg", _set(f"{SYN}.source.synthetic.seed", -1), f"{SYN}.source.synthetic.seed"),
    ("split_seed_neg", _set(f"{SYN}.protocols.blended.seed", -2), f"{SYN}.protocols.blended.seed"),
    ("split_names_dup", _set(f"{SYN}.protocols.blended.names", ["1_8", "1_8"]), "blended.names"),
    ("split_name_path", _set(f"{SYN}.protocols.blended.names", ["../x"]), "blended.names"),
    ("study_seeds_dup", _demo(seeds=[0, 0]), "studies.demo.seeds"),
    ("study_seed_neg", _demo(seeds=[-1]), "studies.demo.seeds"),
    ("study_variants_dup", _demo(variants=["dssn", "dssn"]), "studies.demo.variants"),
    ("study_splits_dup", _demo(splits=["1_8", "1_8"]), "studies.demo.splits"),
    ("study_name_quote", _rename_study("de'mo"), "studies.de'mo"),
    ("study_name_slash", _rename_study("a/b"), "studies.a/b"),
    ("study_name_space", _rename_study("my study"), "studies.my study"),
    ("sweep_grace_0", _sweep(grace_period=0), "sweeps.s.grace_period"),
    ("sweep_seeds_dup", _sweep(seeds=[1, 1]), "sweeps.s.seeds"),
    ("sweep_seeds_empty", _sweep(seeds=[]), "sweeps.s.seeds"),
    ("pretrain_wd_neg", _set("pretrain", {"p": {"seed": 3, "weight_decay": -1}}), "pretrain.p.weight_decay"),
    ("pretrain_seed_neg", _set("pretrain", {"p": {"seed": -3}}), "pretrain.p.seed"),
    # checks that held before issue 12 (kept by this table)
    ("epochs_0", _set("train.epochs", 0), "train.epochs"),
    ("epochs_float", _set("train.epochs", 2.5), "train.epochs"),
    ("epochs_str", _set("train.epochs", "ten"), "train.epochs"),
    ("epochs_bool", _set("train.epochs", True), "train.epochs"),
    ("iters_0", _set("train.iters_per_epoch", 0), "train.iters_per_epoch"),
    ("batch_l_0", _set("train.batch_l", 0), "train.batch_l"),
    ("crop_small", _set("train.crop", 8), "train.crop"),
    ("lr_0", _set("train.lr", 0), "train.lr"),
    ("threads_0", _set("train.threads", 0), "train.threads"),
    ("ohem_thresh_1", _set("train.ohem_thresh", 1.0), "train.ohem_thresh"),
    ("optimizer_bad", _set("train.optimizer", "adam"), "train.optimizer"),
    ("device_bad", _set("train.device", "tpu"), "train.device"),
    ("amp_str", _set("train.amp", "yes"), "train.amp"),
    ("unknown_train_key", _set("train.epoch", 3), "train.epoch"),
    ("unknown_section", _set("trainer", {}), "trainer"),
    ("ray_cpus_0", _set("ray.cpus_per_trial", 0), "ray.cpus_per_trial"),
    ("ray_gpus_neg", _set("ray.gpus_per_trial", -1), "ray.gpus_per_trial"),
    ("ray_workers_0", _set("ray.workers_per_trial", 0), "ray.workers_per_trial"),
    ("backbone_bad", _set("model.backbone", "resnet152"), "model.backbone"),
    ("aspp_two", _set("model.aspp_rates", [6, 12]), "model.aspp_rates"),
    ("stride_bad", _set("model.output_stride", 32), "model.output_stride"),
    ("method_r_big", _set("method.r", 1.5), "method.r"),
    ("method_tau_1", _set("method.tau_low", 1.0), "method.tau_low"),
    ("method_ema_1", _set("method.ema_keep", 1.0), "method.ema_keep"),
    ("method_cutmix_big", _set("method.cutmix_p", 1.5), "method.cutmix_p"),
    ("method_w_con_neg", _set("method.w_con", -1), "method.w_con"),
    ("method_nfp_3", _set("method.n_fp", 3), "method.n_fp"),
    ("num_classes_1", _set(f"{SYN}.num_classes", 1), f"{SYN}.num_classes"),
    ("synthetic_size_small", _set(f"{SYN}.source.synthetic.size", 16), f"{SYN}.source.synthetic.size"),
    ("study_dataset_missing", _demo(dataset="voc"), "studies.demo.dataset"),
    ("study_seeds_empty", _demo(seeds=[]), "studies.demo"),
    ("study_variant_unknown", _demo(variants=["magic"]), "studies.demo.variants"),
    ("paths_results_list", _set("paths.results", [1]), "paths.results"),
    ("pretrain_same_seed", _set("pretrain", {"p": {"seed": 0}}), "pretrain.p.seed"),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "params.yaml"
    }


_DB: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _finished_study_db(tmp_path_factory):
    """An MLflow store holding a finished study (experiment, parent and trial run), built once; each
    case gets a copy as `mlflow.db`, so the snapshot shows that no earlier run changed."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("db")
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    exp = client.create_experiment("dssn/demo", artifact_location=(d / "art").as_uri())
    parent = client.create_run(exp, tags={"role": "parent", "dssn.study": "demo"}).info.run_id
    trial = client.create_run(exp, tags={"role": "trial", "dssn.study": "demo", "mlflow.parentRunId": parent})
    client.log_metric(trial.info.run_id, "val/miou_student", 1.0, step=1)
    client.set_terminated(trial.info.run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    _DB["path"] = d / "mlflow.db"
    yield


def _earlier_outputs(root: Path) -> None:
    """What a finished study leaves: result files, a table, a Ray experiment folder, MLflow runs."""
    import shutil

    shutil.copy2(_DB["path"], root / "mlflow.db")
    for rel, text in {
        "results/runs/demo/1_4-resnet18-dssn-s0.json": '{"cell": "1_4-resnet18-dssn-s0", "mlflow_run_id": "0"}\n',
        "results/tables/demo.md": "| table |\n",
        "ray_results/demo-0123456789/mlflow_parent_run_id": "abc\n",
        "data/splits/synthetic/blended/1_4/labeled.txt": "a\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _params(root: Path, mutate: Mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def _one_clean_line(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], err


@pytest.mark.parametrize(
    ("mutate", "needle"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
@pytest.mark.parametrize("stage", ["train", "validate"])
def test_bad_config_stops_before_any_work(tmp_path, monkeypatch, capsys, mutate, needle, stage):
    _earlier_outputs(tmp_path)
    p = _params(tmp_path, mutate)
    before = _snapshot(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    study = next(iter(yaml.safe_load(p.read_text())["studies"]))
    rc = main(["--params", str(p), *(["train", study] if stage == "train" else ["validate"])])
    assert rc == 2
    _one_clean_line(capsys.readouterr().err, needle)
    assert _snapshot(tmp_path) == before


def _env(root: Path, **extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "DVC_"))}
    e.update(DVC_ROOT=str(root), PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true", **extra)
    return e


def run_stage(root: Path, args: list[str], timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    """`python stages/<stage>.py ...` (or `-m module` when args[0] starts with '-m')."""
    cmd = (
        [sys.executable, *args]
        if args[0] == "-m"
        else [sys.executable, str(REPO / "stages" / args[0]), *args[1:]]
    )
    return subprocess.run(
        cmd, cwd=root, env=_env(root, **extra), capture_output=True, text=True, timeout=timeout
    )


SUBPROCESS_CONFIG = ["eval_every_0", "ray_num_cpus_neg", "study_name_quote", "lr_nan"]


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_CONFIG)
def test_bad_config_through_the_stage_script(tmp_path, case):
    mutate, needle = next(c[1:] for c in CONFIG_CASES if c[0] == case)
    _earlier_outputs(tmp_path)
    p = _params(tmp_path, mutate)
    before = _snapshot(tmp_path)
    study = next(iter(yaml.safe_load(p.read_text())["studies"]))
    out = run_stage(tmp_path, ["train.py", study])
    assert out.returncode == 2, out.stderr[-2000:]
    _one_clean_line(out.stderr, needle)
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- fetch (defect 3)


def _corrupt_tgz(good: Path, out: Path) -> Path:
    """A gzip stream that is fine but whose tar has a bad member header half-way (tarfile stops
    there without a word)."""
    import gzip
    import tarfile

    raw = bytearray(gzip.decompress(good.read_bytes()))
    with tarfile.open(good) as t:
        members = t.getmembers()
    off = members[len(members) // 2].offset
    raw[off : off + 100] = b"\x01" * 100
    out.write_bytes(gzip.compress(bytes(raw)))
    return out


def _wrong_layout_tar(tmp: Path, out: Path) -> Path:
    import tarfile

    (tmp / "wrong" / "JPEGImages").mkdir(parents=True)
    (tmp / "wrong" / "JPEGImages" / "a.jpg").write_bytes(b"x")
    with tarfile.open(out, "w") as t:
        t.add(tmp / "wrong", arcname="VOC2012")
    return out


def _traversal_tar(out: Path) -> Path:
    import io
    import tarfile

    info = tarfile.TarInfo("../evil.txt")
    info.size = 3
    with tarfile.open(out, "w") as t:
        t.addfile(info, io.BytesIO(b"bad"))
    return out


FETCH_CASES = {
    "corrupt_tgz": (lambda tmp, good: _corrupt_tgz(good, tmp / "bad.tgz"), "corrupt"),
    "truncated_tgz": (
        lambda tmp, good: (tmp / "trunc.tgz").write_bytes(good.read_bytes()[:-700]) and tmp / "trunc.tgz",
        "truncated or corrupt",
    ),
    "wrong_layout_tar": (
        lambda tmp, good: _wrong_layout_tar(tmp, tmp / "wrong.tar"),
        "not the expected archive",
    ),
    "traversal_tar": (lambda tmp, good: _traversal_tar(tmp / "evil.tar"), "escape"),
    "not_an_archive": (
        lambda tmp, good: (tmp / "text.tgz").write_text("hello\n" * 100) and tmp / "text.tgz",
        "truncated or corrupt",
    ),
}


def _voc_params(root: Path, archive: Path, md5: str | None) -> Path:
    def mutate(raw: dict) -> None:
        raw["datasets"]["voc"] = {
            "kind": "voc",
            "num_classes": 21,
            "protocols": {"blended": {"names": ["1_8"]}},
            "source": {"archive": str(archive), "md5": md5, "use_sbd": False, "verify_counts": False},
        }

    return _params(root, mutate)


@pytest.mark.parametrize("case", sorted(FETCH_CASES))
def test_bad_archive_keeps_the_earlier_extraction(tmp_path, monkeypatch, capsys, case):
    from tests.data.builders import tar_of, voc_tree

    src = tmp_path / "src"
    voc_tree(src)
    good = tar_of(src / "VOCdevkit", tmp_path / "voc.tgz", "VOCdevkit")
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(root)
    p = _voc_params(root, good, hashlib.md5(good.read_bytes()).hexdigest())
    assert main(["--params", str(p), "fetch", "voc"]) == 0
    capsys.readouterr()
    before = _snapshot(root)
    assert any("JPEGImages" in k for k in before)

    make, needle = FETCH_CASES[case]
    bad = make(tmp_path, good)
    p = _voc_params(root, bad, hashlib.md5(bad.read_bytes()).hexdigest())
    assert main(["--params", str(p), "fetch", "voc"]) == 2
    err = capsys.readouterr().err
    _one_clean_line(err, needle)
    assert bad.name in err
    assert _snapshot(root) == before
    assert not [q for q in (root / "data/raw/voc").iterdir() if q.name.startswith(".tmp")]


# --------------------------------------------------------------------------- places (defects 4, 7)


def _fake_splits(root: Path) -> None:
    """Just enough for `train demo` to reach its pre-flight checks (no training happens)."""
    for split in ("1_16", "1_8", "1_4"):
        f = root / "data/splits/synthetic/blended" / split / "split.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text('{"n_labeled": 1, "n_train": 2}\n')


def _under_file(key: str, leaf: str) -> Callable[[Path], Mutate]:
    """paths.<key> names a folder below a plain file."""

    def make(root: Path) -> Mutate:
        (root / "afile").write_text("not a folder\n")
        return _set(f"paths.{key}", f"afile/{leaf}")

    return make


def _sqlite_under_file(root: Path) -> Mutate:
    (root / "afile").write_text("x\n")
    return _set("paths.mlflow_uri", f"sqlite:///{root}/afile/mlflow.db")


def _keep(root: Path) -> Mutate:
    return lambda raw: None


# (case id, make mutation(root), environment, stages to run, text of the one line)
PLACE_CASES: list[tuple[str, Callable[[Path], Mutate], dict[str, str], str]] = [
    ("ray_address_closed_port", _keep, {"RAY_ADDRESS": "127.0.0.1:9"}, "RAY_ADDRESS=127.0.0.1:9"),
    ("ray_address_ray_scheme", _keep, {"RAY_ADDRESS": "ray://127.0.0.1:9"}, "RAY_ADDRESS=ray://127.0.0.1:9"),
    ("ray_address_garbage", _keep, {"RAY_ADDRESS": "not-an-address"}, "RAY_ADDRESS=not-an-address"),
    ("mlflow_http_closed", _keep, {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}, "http://127.0.0.1:9"),
    ("mlflow_unknown_scheme", _keep, {"MLFLOW_TRACKING_URI": "foo://bar"}, "foo://bar"),
    (
        "mlflow_postgres_closed",
        _keep,
        {"MLFLOW_TRACKING_URI": "postgresql://u@127.0.0.1:9/db"},
        "127.0.0.1:9",
    ),
    ("mlflow_sqlite_under_file", _sqlite_under_file, {}, "paths.mlflow_uri"),
    ("results_under_file", _under_file("results", "results"), {}, "paths.results"),
    (
        "results_is_file",
        lambda root: (root / "res").write_text("x") and _set("paths.results", "res"),
        {},
        "res",
    ),
    ("ray_results_under_file", _under_file("ray_results", "rr"), {}, "paths.ray_results"),
    (
        "ray_results_unknown_scheme",
        lambda root: _set("paths.ray_results", "nosuch://b/x"),
        {},
        "paths.ray_results: nosuch://b/x",
    ),
    (
        "ray_results_s3_closed",  # an S3 endpoint where nothing answers
        lambda root: _set("paths.ray_results", "s3://dssn-b/x"),
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        "paths.ray_results: s3://dssn-b/x",
    ),
    ("artifacts_under_file", _under_file("mlflow_artifacts", "art"), {}, "paths.mlflow_artifacts"),
]


@pytest.mark.parametrize(
    ("make", "env", "needle"), [c[1:] for c in PLACE_CASES], ids=[c[0] for c in PLACE_CASES]
)
@pytest.mark.parametrize("stage", ["train", "report"])
def test_unreachable_or_unwritable_places_stop_before_any_work(
    tmp_path, monkeypatch, capsys, make, env, needle, stage
):
    import time

    _earlier_outputs(tmp_path)
    _fake_splits(tmp_path)
    p = _params(tmp_path, make(tmp_path))
    if stage == "report" and "RAY_ADDRESS" in env:
        pytest.skip("the report does not use Ray")
    if stage == "report" and ("ray_results" in needle or "artifacts" in needle):
        pytest.skip("the report does not write Ray results")
    before = _snapshot(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    rc = main(["--params", str(p), *(["train", "demo"] if stage == "train" else ["report"])])
    assert rc == 2
    assert time.time() - t0 < 15, "a pre-flight check took too long"
    _one_clean_line(capsys.readouterr().err, needle)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("MLFLOW_TRACKING_URI", lambda url: url.rsplit("/", 1)[0], lambda v: "not an MLflow server"),
        (
            "RAY_ADDRESS",
            lambda url: url.split("//")[1].split("/")[0],
            lambda v: f"RAY_ADDRESS={v}: {v} answers, but not as a Ray",
        ),
    ],
    ids=["mlflow", "ray"],
)
def test_a_server_that_answers_but_is_not_the_service_is_named(
    tmp_path, monkeypatch, capsys, var, value, needle
):
    """An HTTP server where MLflow (or Ray's GCS) should be: one line naming what answered."""
    from tests.data.server import LocalServer

    _fake_splits(tmp_path)
    p = _params(tmp_path, lambda raw: None)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with LocalServer() as srv:
        v = value(srv.add("/x", b"x"))
        monkeypatch.setenv(var, v)
        assert main(["--params", str(p), "train", "demo"]) == 2
    _one_clean_line(capsys.readouterr().err, needle(v))


@pytest.mark.slow
def test_ray_address_of_a_live_cluster_passes(monkeypatch):
    """The gRPC probe accepts a real Ray GCS (a private local cluster, shut down afterwards)."""
    import shutil
    import tempfile

    import ray

    from pipeline.preflight import check_ray_address

    d = tempfile.mkdtemp(prefix="rt")
    monkeypatch.setenv("RAY_TMPDIR", d)
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=100 * 1024**2)
    try:
        monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
        check_ray_address()
    finally:
        ray.shutdown()
        shutil.rmtree(d, ignore_errors=True)


SUBPROCESS_PLACES = [
    "ray_address_closed_port",
    "mlflow_http_closed",
    "mlflow_unknown_scheme",
    "results_under_file",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SUBPROCESS_PLACES)
def test_places_through_the_stage_script(tmp_path, case):
    make, env, needle = next(c[1:] for c in PLACE_CASES if c[0] == case)
    _earlier_outputs(tmp_path)
    _fake_splits(tmp_path)
    _params(tmp_path, make(tmp_path))
    before = _snapshot(tmp_path)
    out = run_stage(tmp_path, ["train.py", "demo"], timeout=60, **env)
    assert out.returncode == 2, out.stderr[-2000:]
    _one_clean_line(out.stderr, needle)
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- splits CLI (defect 6)


def _splits_cli(tmp_path: Path, out: Path, *extra: str, subprocess_: bool = False) -> tuple[int, str]:
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"id{i:03d}\n" for i in range(64)))
    args = ["--ids", str(ids), "--protocol", "blended", "--splits", "1_8", "1_4", "--out", str(out), *extra]
    if subprocess_:
        r = run_stage(tmp_path, ["-m", "pipeline.data.splits", *args])
        return r.returncode, r.stderr
    from pipeline.data.splits import main as splits_main

    return splits_main(args), ""


@pytest.mark.parametrize("how", ["in_process", "subprocess"])
def test_splits_cli_never_replaces_a_file_at_out(tmp_path, capsys, how):
    out = tmp_path / "precious.txt"
    out.write_text("my notes\n")
    rc, err = _splits_cli(tmp_path, out, subprocess_=how == "subprocess")
    err = err or capsys.readouterr().err
    assert rc == 2
    _one_clean_line(err, str(out))
    assert out.read_text() == "my notes\n"


def test_splits_cli_keeps_what_else_the_out_folder_holds(tmp_path):
    out = tmp_path / "lists"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "notes.txt").write_text("mine\n")
    (out / "1_8").mkdir()
    (out / "1_8" / "labeled.txt").write_text("old\n")
    rc, _ = _splits_cli(tmp_path, out)
    assert rc == 0
    assert (out / "keep" / "notes.txt").read_text() == "mine\n"
    assert (out / "1_8" / "labeled.txt").read_text() != "old\n"
    assert (out / "1_4" / "split.json").exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".tmp")]


@pytest.mark.parametrize("how", ["in_process", "subprocess"])
def test_splits_cli_uncreatable_out_is_one_line(tmp_path, capsys, how):
    (tmp_path / "afile").write_text("x\n")
    out = tmp_path / "afile" / "lists"
    rc, err = _splits_cli(tmp_path, out, subprocess_=how == "subprocess")
    err = err or capsys.readouterr().err
    assert rc == 2
    _one_clean_line(err, "afile")
    assert (tmp_path / "afile").read_text() == "x\n"


# --------------------------------------------------------------------------- report inputs


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '{"cell": "x"}', "", '{"mlflow_run_id": 1'],
    ids=["cut", "list", "no_run", "empty", "cut2"],
)
def test_damaged_result_file_is_named_by_the_report(tmp_path, monkeypatch, capsys, text):
    _earlier_outputs(tmp_path)
    bad = tmp_path / "results/runs/demo/1_8-resnet18-dssn-s0.json"
    bad.write_text(text)
    p = _params(tmp_path, lambda raw: None)
    before = _snapshot(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(p), "report"]) == 2
    _one_clean_line(capsys.readouterr().err, str(bad))
    assert _snapshot(tmp_path) == before


# --------------------------------------------------------------------------- through `dvc repro`


@pytest.mark.slow
@pytest.mark.parametrize("case", ["eval_every_0", "study_name_quote"])
def test_bad_config_through_dvc_repro(tmp_path, case):
    """The same one line comes out of `dvc repro`, and the stage writes nothing."""
    from tests.test_e2e_dvc import copy_repo, dvc

    mutate, needle = next(c[1:] for c in CONFIG_CASES if c[0] == case)
    work = copy_repo(tmp_path)
    _params(work, mutate)
    out = dvc(["repro", "--single-item", "fetch@synthetic"], work)
    assert out.returncode != 0
    err = out.stdout + out.stderr
    assert "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and needle in ours[0], err[-3000:]
    assert not (work / "data" / "raw").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root + setpriv")
@pytest.mark.parametrize("stage", [["train.py", "demo"], ["report.py"]], ids=["train", "report"])
def test_read_only_results_is_named_before_any_work(stage):
    """Defect 7: a read-only results/ (as a user who may not write it: root writes anywhere) stops
    the stage at once in one line, instead of after the whole training."""
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="ro"))  # below /tmp/pytest-of-root `nobody` cannot reach
    try:
        _earlier_outputs(work)
        _fake_splits(work)
        _params(work, lambda raw: None)
        for p in [work, *work.rglob("*")]:
            os.chown(p, 65534, 65534)
        for p in [work / "results", *(work / "results").rglob("*")]:
            os.chown(p, 0, 0)  # owned by root, mode 755/644: read-only for `nobody`
        work.chmod(0o755)
        before = _snapshot(work)
        cmd = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        out = subprocess.run(
            [*cmd, str(REPO / "stages" / stage[0]), *stage[1:]],
            cwd=work,
            env=_env(work, HOME=str(work)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        _one_clean_line(out.stderr, "not writable")
        assert str(work / "results") in out.stderr
        assert _snapshot(work) == before
    finally:
        shutil.rmtree(work, ignore_errors=True)
