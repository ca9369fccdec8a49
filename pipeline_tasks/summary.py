"""``lmpipe summary``: the headline numbers of the last run, one line per stage.

``dvc metrics show`` prints every metric of every stage as one very wide table (hundreds of
columns); this is what ``make run`` prints at the end instead: what each stage produced and
the decision it took. It reads the stage reports named in ``params.paths`` and nothing else
(no torch, no DVC), and marks a stage ``not run`` when its report is missing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline_tasks.cli import parse_overrides
from pipeline_tasks.config import load_params


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        return {"_error": f"{path}: unreadable ({exc})"}


def _prepare(d: dict) -> str:
    splits = d.get("splits", {})
    parts = "/".join(str(splits.get(s, {}).get("docs", "?")) for s in ("train", "val", "test"))
    docs = d.get("docs", {})
    return f"{docs.get('in', '?'):,} -> {docs.get('out', '?'):,} docs (train/val/test {parts})"


def _validate(d: dict, report_dir: Path) -> str:
    verdict = "PASSED" if d.get("success") else "FAILED"
    docs = report_dir / d["data_docs"] if d.get("data_docs") else None
    return f"{verdict}: {d.get('successful', '?')}/{d.get('evaluated', '?')} expectations (Data Docs: {docs})"


def _tokenize(d: dict) -> str:
    tokens = d.get("tokens", {})
    return (
        f"vocab {d.get('vocab_size')}, {tokens.get('train', 0):,} train tokens, "
        f"{d.get('tokens_per_byte', {}).get('all', float('nan')):.3f} tokens/byte"
    )


def _pretrain(d: dict) -> str:
    return (
        f"{d.get('train/steps')} steps, {d.get('train/tokens', 0):,} tokens at {d.get('train/tokens_per_s', 0):,.0f} tok/s; "
        f"val loss {d.get('val/loss', float('nan')):.3f}, bits/byte {d.get('val/bpb', float('nan')):.3f}"
    )


def _finetune(d: dict) -> str:
    test = d.get("test", {})
    base = "from scratch" if d.get("from_scratch") else "pretrained"
    return (
        f"{base}: test accuracy {test.get('accuracy', float('nan')):.4f}, macro-F1 "
        f"{test.get('macro_f1', float('nan')):.4f} on {test.get('n')} rows ({d.get('train', {}).get('seconds', 0):.0f} s)"
    )


def _compress(d: dict) -> str:
    if not d.get("enabled"):
        return "disabled: the fine-tuned model is exported (dvc exp run -S compress.enabled=true for a student)"
    rows = {r["model"]: r for r in d.get("rows", [])}
    shipped, teacher = rows.get(d.get("shipped"), {}), rows.get("teacher", {})
    return (
        f"{d.get('shipped')} student {shipped.get('params', 0) / 1e6:.2f} M params: int8 test accuracy "
        f"{shipped.get('test_accuracy_int8', float('nan')):.4f} vs teacher {teacher.get('test_accuracy_int8', float('nan')):.4f}, "
        f"{shipped.get('speedup_vs_teacher', float('nan')):.2f}x faster ({d.get('seconds', 0):.0f} s)"
    )


def _evaluate(d: dict) -> str:
    by_source = d.get("slices", {}).get("source", {})
    sources = ", ".join(f"{name} {s['accuracy']:.4f}" for name, s in sorted(by_source.items()) if "accuracy" in s)
    return (
        f"{d.get('serving_variant')}: accuracy {d.get('accuracy', float('nan')):.4f} "
        f"[{d.get('accuracy_ci_low', float('nan')):.4f}, {d.get('accuracy_ci_high', float('nan')):.4f}] "
        f"on {d.get('n_test')} test rows"
        + (f" ({sources})" if sources else "")
        + f", p95 {d.get('latency_p95_ms', float('nan')):.2f} ms, {d.get('size_mb', float('nan')):.1f} MB"
        + _baseline_gap(d)
        + _student_gap(d)
    )


def _student_gap(d: dict) -> str:
    if not d.get("compressed"):
        return ""
    return (
        f"; student vs teacher {-100 * d.get('student_accuracy_drop', float('nan')):+.2f} points, "
        f"{d.get('student_speedup', float('nan')):.2f}x faster"
    )


def _baseline_gap(d: dict) -> str:
    if d.get("gain_over_baseline") is None:
        return "; no n-gram baseline"
    return (
        f"; n-gram baseline {d.get('baseline_accuracy', float('nan')):.4f}, gap "
        f"{100 * d['gain_over_baseline']:+.2f} points [{100 * d.get('gain_over_baseline_ci_low', float('nan')):+.2f}, "
        f"{100 * d.get('gain_over_baseline_ci_high', float('nan')):+.2f}]"
    )


def _gates(d: dict) -> str:
    failed = [name for name, g in d.get("gates", {}).items() if g.get("passed") is False]
    return d.get("summary", "?") + (f" - failed: {', '.join(failed)}" if failed else "")


def _monitor(d: dict) -> str:
    return str(d.get("summary", "?"))


def _register(d: dict) -> str:
    if d.get("status") != "registered":
        return f"{d.get('status')}: nothing registered ({d.get('gates_summary', 'gates not passed')})"
    return f"{d.get('model_name')} version {d.get('version')} registered as challenger ({d.get('tracking_uri')})"


def rows(params) -> list[tuple[str, str]]:
    """``(stage, line)`` per report, in pipeline order."""
    p = params.paths
    reports: list[tuple[str, Path, Callable[[dict], str]]] = [
        ("prepare", Path(p.prepare_reports_dir) / "stats.json", _prepare),
        ("validate", Path(p.validate_dir) / "summary.json", lambda d: _validate(d, Path(p.validate_dir))),
        ("tokenize", Path(p.tokenize_reports_dir) / "metrics.json", _tokenize),
        ("pretrain", Path(p.pretrain_reports_dir) / "metrics.json", _pretrain),
        ("finetune", Path(p.finetune_reports_dir) / "metrics.json", _finetune),
        ("compress", Path(p.compress_reports_dir) / "metrics.json", _compress),
        ("evaluate", Path(p.evaluate_dir) / "metrics.json", _evaluate),
        ("gates", Path(p.evaluate_dir) / "gates.json", _gates),
        ("monitor", Path(p.monitor_dir) / "drift_summary.json", _monitor),
        ("register", Path(p.register_reports_dir) / "registration.json", _register),
    ]
    out = []
    for stage, path, describe in reports:
        data = _read(path)
        if data is None:
            out.append((stage, f"not run ({path} missing)"))
        elif "_error" in data:
            out.append((stage, data["_error"]))
        else:
            try:
                out.append((stage, describe(data)))
            except (TypeError, ValueError, AttributeError) as exc:  # an older report layout
                out.append((stage, f"{path}: unexpected layout ({exc})"))
    return out


def add_summary_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print {stage: line} as JSON")


def cli_summary(args: argparse.Namespace) -> int:

    params = load_params(args.params, parse_overrides(args.overrides))
    table = rows(params)
    if args.json:
        print(json.dumps(dict(table), indent=2))
    else:
        width = max(len(stage) for stage, _ in table)
        print("\n".join(f"{stage:<{width}}  {line}" for stage, line in table))
    return 0
