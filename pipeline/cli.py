"""`dssn <stage> ...`: the single entry point the DVC stages call.

Each command parses params.yaml into the typed config (bad params -> exit 2 before any work),
calls one library function and writes its outputs. Errors print one clear line, not a trace.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, Params, load_params
from pipeline.io import write_json


def _root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def _dataset(params: Params, name: str):
    if name not in params.datasets:
        raise ConfigError(
            f"params: dataset {name!r} is not defined under `datasets` ({', '.join(params.datasets)})"
        )
    return params.datasets[name]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path.resolve())


def cmd_fetch(params: Params, root: Path, name: str) -> None:
    """Generate (synthetic) or download/verify (real) a dataset into data/raw/<name>."""
    ds = _dataset(params, name)
    raw = root / params.paths.data / "raw" / name
    raw.mkdir(parents=True, exist_ok=True)
    src = ds.source
    if ds.kind == "synthetic":
        from pipeline.data.synthetic import generate

        s = src.synthetic
        generate(raw / "VOC2012", s.n_train, s.n_val, s.size, s.seed, s.scene())
        source = {"voc_root": _rel(raw / "VOC2012", root), "sbd_root": None}
    elif ds.kind == "voc":
        from pipeline.data import fetch

        kw = {k: v for k, v in {"url": src.url, "md5": src.md5}.items() if v}
        if src.verify_counts:
            kw["counts"] = fetch.VOC_COUNTS
        voc = fetch.fetch_voc(raw, archive=_opt(src.archive, root), extracted=_opt(src.extracted, root), **kw)
        sbd = None
        if src.use_sbd:
            kw = {k: v for k, v in {"url": src.sbd_url, "md5": src.sbd_md5}.items() if v}
            if src.verify_counts:
                kw["counts"] = fetch.SBD_COUNTS
            sbd = fetch.fetch_sbd(
                raw, archive=_opt(src.sbd_archive, root), extracted=_opt(src.sbd_extracted, root), **kw
            )
        source = {"voc_root": _rel(voc, root), "sbd_root": _rel(sbd, root) if sbd else None}
    else:
        from pipeline.data import fetch

        kw = {"base_url": src.url} if src.url else {}
        if src.verify_counts:
            kw["counts"] = fetch.CITYSCAPES_COUNTS
        cs = fetch.fetch_cityscapes(
            raw, extracted=_opt(src.extracted, root), archives=_archives(src.archive, root), **kw
        )
        source = {"cityscapes_root": _rel(cs, root)}
    write_json(raw / "source.json", {"kind": ds.kind, **source})
    print(f"fetch {name}: {json.dumps(source)}")


def _opt(p: str | None, root: Path) -> Path | None:
    return None if p is None else (root / p).resolve()


def _archives(spec: str | None, root: Path) -> dict[str, Path] | None:
    """`archive` for Cityscapes names a folder holding the two official zips."""
    if spec is None:
        return None
    folder = (root / spec).resolve()
    return {z: folder / z for z in ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip")}


def cmd_prepare(params: Params, root: Path, name: str) -> None:
    from pipeline.data.prepare import prepare_cityscapes, prepare_voc

    ds = _dataset(params, name)
    raw = root / params.paths.data / "raw" / name
    meta_file = raw / "source.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} is missing: run the fetch stage first (dvc repro fetch@{name})")
    meta = json.loads(meta_file.read_text())
    out = root / params.paths.data / "prepared" / name
    if ds.kind == "cityscapes":
        info = prepare_cityscapes(root / meta["cityscapes_root"], out)
    else:
        sbd = root / meta["sbd_root"] if meta.get("sbd_root") else None
        info = prepare_voc(root / meta["voc_root"], out, sbd_root=sbd, num_classes=ds.num_classes)
    print(f"prepare {name}: {info}")


def cmd_splits(params: Params, root: Path, name: str) -> None:
    """Every protocol of a dataset into data/splits/<dataset>/<protocol>/ (one atomic swap)."""
    import shutil

    from pipeline.data.published import PublishedSource
    from pipeline.data.splits import make_splits
    from pipeline.io import replace_dir

    ds = _dataset(params, name)
    prepared = root / params.paths.data / "prepared" / name
    out = root / params.paths.data / "splits" / name
    tmp = out.parent / f".tmp-all-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for protocol, sp in ds.protocols.items():
            published = None
            if sp.source == "published":
                # downloads are cached beside the dataset's other data, outside every stage's outputs
                published = PublishedSource.for_kind(
                    ds.kind,
                    url=sp.published_url,
                    root=_opt(sp.published_root, root),
                    cache=root / params.paths.data / "published" / name,
                )
            info = make_splits(
                prepared / "lists",
                tmp / protocol,
                protocol,
                sp.names,
                source=sp.source,
                seed=sp.seed,
                official_root=_opt(sp.official_root, root),
                root=prepared,
                published=published,
            )
            for split, meta in info.items():
                print(
                    f"splits {name}/{protocol}/{split}: {meta['n_labeled']} labeled, "
                    f"{meta['n_unlabeled']} unlabeled"
                )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def cmd_pretrain(params: Params, root: Path) -> None:
    """Every `pretrain` entry into data/pretrained/<name>.pt; an entry whose config is unchanged
    is kept (its `.json` records the config hash), files of removed entries are deleted."""
    from pipeline.pretrain import config_hash, pretrain

    out = root / params.paths.data / "pretrained"
    out.mkdir(parents=True, exist_ok=True)
    for name, cfg in params.pretrain.items():
        pt, meta = out / f"{name}.pt", out / f"{name}.json"
        if (
            pt.exists()
            and meta.exists()
            and json.loads(meta.read_text()).get("config_hash") == config_hash(cfg)
        ):
            print(f"pretrain {name}: up to date ({_rel(pt, root)})")
            continue
        info = pretrain(cfg, pt)
        print(f"pretrain {name}: {info['held_out']} in {info['seconds']} s -> {_rel(pt, root)}")
    for f in [*out.glob("*.pt"), *out.glob("*.json")]:
        if f.stem not in params.pretrain and f.name != "index.json":
            f.unlink()
    write_json(out / "index.json", {n: f"{n}.pt" for n in params.pretrain})


def cmd_train(params: Params, root: Path, study: str) -> None:
    from pipeline.orchestrate import run_study

    if study not in params.studies:
        raise ConfigError(
            f"params: study {study!r} is not defined under `studies` ({', '.join(params.studies)})"
        )
    summaries = run_study(params, study, root)
    for s in summaries:
        best = s.get("final/miou_best")
        print(f"{s['cell']}: best mIoU {best:.2f}" if best is not None else s["cell"])
    write_trained_marker(root / params.paths.data / "trained" / f"{study}.json", study, summaries)


def write_trained_marker(path: Path, study: str, summaries: list[dict]) -> Path:
    """The per-clone output of `train@<study>` (git-ignored, beside the data).

    The study's result files are committed, but its MLflow runs, checkpoints and Ray results live
    only where it was trained: without an output a fresh clone lacks, `dvc repro` there would skip
    the training and leave an empty MLflow UI. Its content is deterministic (the study and its
    cells, no run ids or times), so checking out another commit with the same cells does not make
    DVC retrain."""
    from pipeline.io import write_json

    cells = sorted(str(s["cell"]) for s in summaries)
    return write_json(path, {"study": study, "cells": cells})


def cmd_sweep(params: Params, root: Path, name: str) -> None:
    from pipeline.sweep import run_sweep

    if name not in params.sweeps:
        raise ConfigError(
            f"params: sweep {name!r} is not defined under `sweeps` ({', '.join(params.sweeps)})"
        )
    for kind, path in run_sweep(params, name, root).items():
        print(f"sweep {name}: {kind} -> {_rel(path, root)}")


def cmd_report(params: Params, root: Path) -> None:
    """Tables, plots, plot data and metrics from the finished cells' result files (DVC outputs of
    `train@<study>`): no tracking server is read. Result files of an older version that lack what
    the report needs are read back from MLflow instead (the error then names the tracking URI)."""
    import shutil

    from pipeline import report
    from pipeline.io import replace_dir
    from pipeline.tracking import resolve_tracking_uri

    results = root / params.paths.results
    _preflight_report(results)
    metrics: dict[str, float] = {}
    data_tmp = results / ".tmp-report_data"
    shutil.rmtree(data_tmp, ignore_errors=True)
    for study, scfg in params.studies.items():
        files = sorted((results / "runs" / study).glob("*.json"))
        if not files:
            print(f"report: study {study} has no finished runs yet; skipped")
            continue
        try:
            df, hist = report.load_results(files)
        except report.OlderResultError as e:
            df, hist = _runs_from_mlflow(resolve_tracking_uri(params.paths.mlflow_uri, root), study, files, e)
        written = report.write_report(df, results, study, paper_table=scfg.paper_table, histories=hist)
        if scfg.publish:
            md = (results / "tables" / f"{study}.md").read_text(encoding="utf-8")
            pngs = [p for p in written if p.suffix == ".png"]
            written.append(report.publish(root / scfg.publish, study, md, pngs))
        report.write_plot_data(df, hist, data_tmp, study)
        for p in written:
            print(f"report: wrote {_rel(p, root)}")
        metrics.update({f"{study}/{k}": v for k, v in report.study_metrics(df).items()})
    data_tmp.mkdir(parents=True, exist_ok=True)
    replace_dir(data_tmp, results / "report_data")
    print(f"report: wrote {_rel(results / 'report_data', root)}/ (plot data for `dvc plots`)")
    write_json(results / "metrics.json", metrics)


def _run_id(result_file: Path) -> str:
    """The MLflow run behind a result file; a damaged file is named, not a KeyError."""
    from pipeline.report import ReportError

    try:
        return str(json.loads(result_file.read_text())["mlflow_run_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise ReportError(
            f"{result_file}: not a result file ({type(e).__name__}); re-run `dvc repro train@<study>`"
        ) from None


def _runs_from_mlflow(uri: str, study: str, files: list[Path], why: Exception):
    """The runs frame and curves of result files too old to carry them, read back from MLflow; a
    store that cannot answer is one line naming it."""
    from pipeline import report
    from pipeline.preflight import check_tracking_uri

    run_ids = {_run_id(f) for f in files}
    try:
        check_tracking_uri(uri)
        df = report.load_runs(uri, [f"dssn/{study}"], run_ids=run_ids)
        return df, report.load_histories(uri, sorted(df["run_id"]))
    except report.ReportError:
        raise
    except Exception as err:  # noqa: BLE001 - an unreachable or broken store: one line
        first = str(err).splitlines()[0] if str(err) else ""
        raise report.ReportError(
            f"{why}; reading those runs from MLflow at {uri} failed: {type(err).__name__}: {first}"
        ) from err


def _preflight_report(results: Path) -> None:
    """The tables can be written, before any result is read (the report needs no tracking store)."""
    from pipeline.preflight import writable_dir

    writable_dir(results, "paths.results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dssn", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for c in ("fetch", "prepare", "splits"):
        sub.add_parser(c).add_argument("dataset")
    sub.add_parser("pretrain")
    sub.add_parser("train").add_argument("study")
    sub.add_parser("sweep").add_argument("sweep")
    sub.add_parser("report")
    sub.add_parser("validate")
    args = parser.parse_args(argv)
    root = _root()
    try:
        params = load_params(root / args.params if not Path(args.params).is_absolute() else args.params)
        if args.cmd == "validate":
            print(f"{args.params}: OK ({len(params.datasets)} datasets, {len(params.studies)} studies)")
        elif args.cmd == "report":
            cmd_report(params, root)
        elif args.cmd == "pretrain":
            cmd_pretrain(params, root)
        elif args.cmd == "train":
            cmd_train(params, root, args.study)
        elif args.cmd == "sweep":
            cmd_sweep(params, root, args.sweep)
        else:
            {"fetch": cmd_fetch, "prepare": cmd_prepare, "splits": cmd_splits}[args.cmd](
                params, root, args.dataset
            )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - one clear line for every expected failure
        from pipeline.data.errors import DataError
        from pipeline.orchestrate import ResourceError
        from pipeline.preflight import PreflightError
        from pipeline.report import ReportError

        if isinstance(e, DataError | ResourceError | ReportError | PreflightError | OSError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
