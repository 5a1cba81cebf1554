import subprocess
import sys

import pytest
import yaml

from pipeline.config import VARIANTS, ConfigError, load_params, method_for_variant
from tests.conftest import REPO


def _write(tmp_path, mutate):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_repo_params_load():
    params = load_params(REPO / "params.yaml")
    assert params.studies["demo"].dataset == "synthetic"
    assert params.method.r == 0.96 and params.method.tau_low == 0.92


@pytest.mark.parametrize(
    ("mutate", "key", "expected"),
    [
        (lambda r: r["method"].update(r=1.5), "method.r", "(0, 1]"),
        (lambda r: r["method"].update(r=0.0), "method.r", "(0, 1]"),
        (lambda r: r["method"].update(tau_low="high"), "method.tau_low", "number"),
        (lambda r: r["train"].update(epochs=2.5), "train.epochs", "integer"),
        (lambda r: r["train"].update(epoch=3), "train.epoch", "unknown key"),
        (lambda r: r["method"].update(selection="magic"), "method.selection", "one of"),
        (lambda r: r["studies"]["demo"].update(dataset="voc"), "studies.demo.dataset", "must name a dataset"),
        (
            lambda r: r["studies"]["demo"].update(variants=["dssn", "nope"]),
            "studies.demo.variants",
            "unknown",
        ),
        (
            lambda r: r["studies"]["demo"]["overrides"]["train"].update(lr=-1),
            "studies.demo.overrides.train.lr",
            "positive",
        ),
        (
            lambda r: r["datasets"]["synthetic"].pop("num_classes"),
            "datasets.synthetic.num_classes",
            "missing",
        ),
        (lambda r: r["studies"]["demo"].update(splits=["1_3"]), "studies.demo.splits", "not built"),
        (lambda r: r["method"].update(warmup_epochs=-1), "method.warmup_epochs", "integer >= 0"),
        (lambda r: r["method"].update(adaptive_momentum=1.0), "method.adaptive_momentum", "in [0, 1)"),
        (lambda r: r["method"].update(selection="flex"), "method.selection", "adaptive"),
        (lambda r: r["method"].update(pl_align_momentum=-0.1), "method.pl_align_momentum", "in [0, 1)"),
        (
            lambda r: r["studies"]["demo"]["overrides"].update(method={"warmup_epochs": 99}),
            "studies.demo",
            "must be below train.epochs",
        ),
        (lambda r: r["ray"].update(max_concurrent=-2), "ray.max_concurrent", "integer >= 0"),
        (lambda r: r["train"].update(batch_l=8, ohem_chunk=3), "train.ohem_chunk", "divisor of batch_l (8)"),
        (lambda r: r["train"].update(ohem_chunk=0), "train.ohem_chunk", "positive divisor"),
        (lambda r: r["train"].update(ohem_min_kept=-1), "train.ohem_min_kept", "integer >= 0"),
        (
            lambda r: r["studies"]["demo"].update(backbone_overrides={"resnet50": {"train": {"lr": 0.1}}}),
            "studies.demo.backbone_overrides.resnet50",
            "names a backbone the study does not train",
        ),
        (
            lambda r: r["studies"]["demo"].update(
                backbone_overrides={"resnet18": {"train": {"ohem_chunk": 5}}}
            ),
            "studies.demo.backbone_overrides.resnet18.train.ohem_chunk",
            "divisor of batch_l",
        ),
        (
            lambda r: r.update(sweeps={"s": {"study": "demo", "split": "1_16", "max_concurrent": 0}}),
            "sweeps.s.max_concurrent",
            "integer >= 1",
        ),
        (
            lambda r: r["studies"]["demo"].update(protocol="classic"),
            "studies.demo.protocol",
            "must be a protocol",
        ),
        (
            lambda r: r["datasets"]["synthetic"]["protocols"].update(u2pl={"names": ["1_8"]}),
            "datasets.synthetic.protocols.u2pl",
            "one of",
        ),
        (
            lambda r: r["studies"]["demo"].update(variant_splits={"unimatch": ["1_16"]}),
            "studies.demo.variant_splits.unimatch",
            "names a variant the study does not train",
        ),
        (
            lambda r: r["studies"]["demo"].update(variant_splits={"dssn": ["1_2"]}),
            "studies.demo.variant_splits.dssn",
            "is not one of `studies.demo.splits`",
        ),
        (
            lambda r: r["datasets"]["synthetic"]["source"]["synthetic"].update(radius=[0.4, 0.2]),
            "datasets.synthetic.source.synthetic.radius",
            "[min, max]",
        ),
        (
            lambda r: r["datasets"]["synthetic"]["source"]["synthetic"].update(objects=[0, 2]),
            "datasets.synthetic.source.synthetic.objects",
            "1 <= min <= max",
        ),
        (lambda r: r["train"].update(scale=[2.0]), "train.scale", "[min, max]"),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, key, expected):
    with pytest.raises(ConfigError) as err:
        load_params(_write(tmp_path, mutate))
    assert key in str(err.value)
    assert expected in str(err.value)


def test_variant_splits_restrict_a_variant_to_some_splits(tmp_path):
    """The demo trains DSSN at 1/16 only, supervised at every fraction; unnamed variants keep all."""
    from pipeline.orchestrate import study_specs

    params = load_params(REPO / "params.yaml")
    cells = [(s.split, s.variant) for s in study_specs(params, "demo", REPO)]
    assert cells == [("1_16", "supervised"), ("1_16", "dssn"), ("1_8", "supervised"), ("1_4", "supervised")]
    wide = load_params(_write(tmp_path, lambda r: r["studies"]["demo"].pop("variant_splits")))
    assert len(study_specs(wide, "demo", REPO)) == 6


def test_cli_exits_2_before_any_work(tmp_path):
    p = _write(tmp_path, lambda r: r["method"].update(r=2))
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--params", str(p), "train", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "`method.r` must be a float in (0, 1], got 2" in out.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def test_variants_are_flags_of_one_method():
    params = load_params(REPO / "params.yaml")
    assert method_for_variant(params.method, "dssn") == params.method
    sup = method_for_variant(params.method, "supervised")
    assert not sup.use_unlabeled
    uni = method_for_variant(params.method, "unimatch")
    assert (uni.teacher, uni.n_fp, uni.selection, uni.threshold) == (False, 1, "fixed", 0.95)
    assert method_for_variant(params.method, "t5_low").con_feat is False
    assert method_for_variant(params.method, "t5_high").con_img is False
    assert method_for_variant(params.method, "f4_fixed092").threshold == 0.92
    assert set(VARIANTS) >= {"supervised", "unimatch", "dssn", "t4_plain", "t4_contrastive", "t4_cplg"}


@pytest.mark.parametrize("name", ["paper.yaml", "evidence.yaml"])
def test_shipped_configs_validate(name):
    params = load_params(REPO / "configs" / name)
    assert params.studies
