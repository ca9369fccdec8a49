"""Real inputs for the monitor / register / promote tests (shared by those test files only).

* :func:`bundles` — real ONNX bundles from the real ``export`` stage, on the tiny project of
  ``_export_project.py`` (real AG News + HuffPost rows, real tokenizer, a GPT trained for seconds).
  Each name is one export run into its own directory (a new manifest, so a new model version);
  built once per test session and kept on disk under the session's base temp dir.
* :func:`raw_news` — ``data/raw/news/<source>.parquet`` from the real ``ingest_news`` stage with the
  source definitions of the repository's ``params.yaml`` (checksums included).
* :func:`write_evaluation` — ``gates.json`` / ``metrics.json`` for given metrics, decided by the real
  gate policy (:func:`pipeline_tasks.ship.gates.decide`), so a test can set up a pass, a fail or a
  regression deterministically.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from _export_project import build_tiny_project

REPO = Path(__file__).resolve().parents[2]
PASSING = {"accuracy": 0.80, "macro_f1": 0.78, "int8_accuracy_drop": 0.002, "latency_p95_ms": 3.0, "size_mb": 0.4}
GATES = {
    "min_accuracy": 0.5,
    "min_macro_f1": 0.5,
    "max_int8_accuracy_drop": 0.02,
    "max_p95_latency_ms": 100.0,
    "max_size_mb": 50.0,
    "max_regression": 0.01,
}


def project(base: Path, corpora: Path):
    return build_tiny_project(base / "tiny_project", corpora, "gpt")


def bundles(base: Path, corpora: Path, names: tuple[str, ...] = ("a",)) -> dict[str, Path]:
    """``{name: bundle_dir}``, one real export per name (cached on disk for the session)."""
    from pipeline_tasks.ship import export

    tiny = project(base, corpora)
    out = {}
    for i, name in enumerate(names):
        target = base / "registry_bundles" / name
        if not (target / "bundle" / "manifest.json").is_file():
            paths = {
                **tiny.raw["paths"],
                "bundle_dir": str(target / "bundle"),
                "export_reports_dir": str(target / "reports"),
            }
            # alternate the serving variant so that versions differ the way real re-exports can
            variant = "int8_dynamic" if i % 2 == 0 else "fp32"
            export.run(
                tiny.params(paths=paths, export={"default_variant": variant, "parity_rows": 64, "calibration_rows": 64})
            )
        out[name] = target / "bundle"
    return out


def raw_news(out_dir: Path, sources: tuple[str, ...]) -> Path:
    """Run the real ingest_news on the named sources of the repo's params.yaml; returns raw_news_dir."""
    from pipeline_tasks.config import parse_params
    from pipeline_tasks.ingest import ingest_news

    raw_dir = out_dir / "raw_news"
    if all((raw_dir / f"{s}.parquet").is_file() for s in sources):
        return raw_dir
    section = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["ingest_news"]
    section["sources"] = [s for s in section["sources"] if s["name"] in sources]
    ingest_news.run(
        parse_params(
            {"paths": {"raw_news_dir": str(raw_dir), "downloads_dir": str(out_dir / "dl")}, "ingest_news": section}
        )
    )
    return raw_dir


def write_evaluation(
    evaluate_dir: Path, metrics: dict, champion: dict | None = None, gates: dict | None = None
) -> dict:
    """``metrics.json`` + ``gates.json`` (real gate decision) + a model card; returns gates.json."""
    from pipeline_tasks.ship.gates import GateThresholds, decide

    evaluate_dir.mkdir(parents=True, exist_ok=True)
    decision = decide(metrics, champion, GateThresholds(**(gates or GATES))).to_dict()
    (evaluate_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (evaluate_dir / "gates.json").write_text(json.dumps(decision), encoding="utf-8")
    (evaluate_dir / "model_card.md").write_text(f"# model card\n\n{decision['summary']}\n", encoding="utf-8")
    return decision


def registry_params(root: Path, bundle_dir: Path, **sections):
    """Params whose paths all live under ``root`` (the bundle excepted)."""
    from pipeline_tasks.config import parse_params

    paths = {
        "bundle_dir": str(bundle_dir),
        "evaluate_dir": str(root / "evaluate"),
        "registry_dir": str(root / "registry"),
        "register_reports_dir": str(root / "reports/register"),
        "validate_dir": str(root / "validate"),
        "monitor_dir": str(root / "monitor"),
        "champion_metrics_path": str(root / "registry/production_metrics.json"),
    }
    raw = {"paths": paths, "register": {}, "evaluate": {"gates": GATES}}
    raw.update(sections)
    return parse_params(raw)
