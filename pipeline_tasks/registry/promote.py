"""``lmpipe promote`` / ``lmpipe rollback``: move the production alias, with checks and a history.

``promote [--version N] [--expect-production N|none] [--reason TEXT]`` moves ``@production`` of
``register.model_name`` to a version (default: the ``@challenger`` alias) that

* passed its gates at registration (version tag ``lmpipe.gates_passed``), and
* does not regress against the current production model: :func:`pipeline_tasks.ship.gates.decide` is
  re-run at promotion time on the metrics stored on both versions (``lmpipe.metrics``) with the
  thresholds of ``evaluate.gates`` (the same tolerance ``max_regression`` evaluate uses).

``rollback [--reason TEXT]`` moves ``@production`` back to the version it replaced, walking back
one step per call. Each change is appended to the promotion history (MLflow keeps none for
aliases): ``registry_dir/promotions.jsonl`` (the audit log: who = ``$LMPIPE_ACTOR`` or the OS
user, when, why, from, to) and, mirrored in the registry itself, the registered-model tags
``lmpipe.history`` (last entries), ``lmpipe.production_stack`` (what rollback walks back) and
``lmpipe.production_seq`` (a change counter), plus ``lmpipe.promoted_*`` tags on the version. The
champion metrics file that ``evaluate`` compares against (``paths.champion_metrics_path``) is
rewritten with the new production version's metrics.

Concurrency (compare-and-set):

* every change runs under an exclusive ``fcntl`` lock on ``registry_dir/promotion.lock`` and
  re-reads the aliases inside it, so two promotions on one machine (the embedded SQLite store, or
  several processes against one server) serialize: exactly one moves the alias, the other sees the
  new state (no-op, or a conflict when ``--expect-production`` no longer holds);
* against a tracking server from several machines the lock file is not shared; the change then is
  optimistic: ``lmpipe.production_seq`` is read before the checks and re-read right before the
  alias moves, and a changed counter aborts with a conflict. MLflow has no atomic
  compare-and-set, so a race inside that last round trip is narrowed, not excluded: run
  promotions from one orchestrator task (the Airflow ``promote`` task uses a pool of one).

Exit codes: 0 promoted / rolled back / nothing to do, 1 refused (gates, regression, conflict,
nothing to roll back), 2 bad params. Params: ``register``, ``evaluate.gates`` and ``paths``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import getpass
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow

from pipeline_tasks.artifacts import atomic_write_json
from pipeline_tasks.cli import parse_overrides
from pipeline_tasks.config import load_params
from pipeline_tasks.errors import PipelineError
from pipeline_tasks.registry import store
from pipeline_tasks.ship.gates import GateThresholds, decide

logger = logging.getLogger(__name__)

HISTORY_FILE = "promotions.jsonl"
LOCK_FILE = "promotion.lock"
TAG_HISTORY = "lmpipe.history"
TAG_STACK = "lmpipe.production_stack"
TAG_SEQ = "lmpipe.production_seq"
STACK_LIMIT = 100
PAST = {"promote": "promoted", "rollback": "rolled_back"}


class PromotionError(PipelineError):
    """A promotion or rollback was refused (gates, regression, conflict, nothing to roll back)."""


def actor() -> str:
    """Who changes production: ``$LMPIPE_ACTOR`` (set by CI / Airflow), else the OS user."""
    try:
        return os.environ.get("LMPIPE_ACTOR") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        return "unknown"


@contextlib.contextmanager
def registry_lock(registry_dir: str | os.PathLike, timeout_s: float):
    """Exclusive advisory lock next to the registry DB; waits up to ``timeout_s``."""
    path = Path(registry_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionError(
                        f"{path}: another promotion holds the registry lock for more than "
                        f"{timeout_s:.0f} s; retry later"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# registry state


def _model_tags(client, name: str) -> dict[str, str]:
    try:
        return dict(client.get_registered_model(name).tags or {})
    except mlflow.exceptions.MlflowException as exc:
        raise store.RegistryError(
            f"model {name!r} is not registered at {mlflow.get_tracking_uri()}; run `lmpipe register` first"
        ) from exc


def _json_tag(tags: dict[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(tags[key]) if key in tags else default
    except ValueError:
        return default


def version_metrics(version) -> dict[str, float] | None:
    raw = (version.tags or {}).get("lmpipe.metrics")
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def check_candidate(candidate, production, gate_thresholds) -> dict[str, Any]:
    """Gate verdict for promoting ``candidate`` over ``production`` (a ModelVersion or None)."""
    tags = candidate.tags or {}
    if tags.get("lmpipe.gates_passed") != "true":
        raise PromotionError(
            f"version {candidate.version} did not pass its gates at registration "
            f"({tags.get('lmpipe.gates_summary', 'no gate record')}); refusing to promote"
        )
    metrics = version_metrics(candidate)
    if metrics is None:
        raise PromotionError(
            f"version {candidate.version} has no lmpipe.metrics tag; it was not registered by "
            "`lmpipe register` and cannot be re-checked"
        )
    champion = version_metrics(production) if production is not None else None
    decision = decide(metrics, champion, gate_thresholds)
    if not decision.passed:
        raise PromotionError(
            f"version {candidate.version} vs production "
            f"{production.version if production is not None else None}: {decision.summary()}"
        )
    return decision.to_dict()


def _append_history(registry_dir: Path, entry: dict[str, Any]) -> None:
    path = registry_dir / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_history(registry_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every entry of ``promotions.jsonl`` (the audit log), oldest first."""
    path = Path(registry_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_champion_metrics(path: Path, name: str, version) -> None:
    """The production version's gate metrics in ``metrics.json`` layout, for ``evaluate``."""
    metrics = version_metrics(version) or {}
    atomic_write_json(
        path,
        {
            **metrics,
            "model_name": name,
            "version": str(version.version),
            "updated_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )


def _settings(params):
    try:
        thresholds = params.evaluate.gates
    except AttributeError:  # no evaluate section: the registration verdict and no regression check
        thresholds = GateThresholds()
    return params.register, thresholds, Path(params.paths.champion_metrics_path)


def change_production(
    params, action: str, version: str | None = None, expect: str | None = None, reason: str = ""
) -> dict[str, Any]:
    """Promote (``action="promote"``) or roll back, as one locked compare-and-set; returns the entry."""
    rp, thresholds, champion_path = _settings(params)
    registry_dir = Path(params.paths.registry_dir)
    client, uri = store.connect(registry_dir)
    name = rp.model_name
    with registry_lock(registry_dir, rp.lock_timeout_s):
        tags = _model_tags(client, name)
        seq = int(tags.get(TAG_SEQ, "0"))
        current = store.alias_version(client, name, rp.production_alias)
        if expect is not None and (current or "none") != expect:
            raise PromotionError(
                f"conflict: expected production {expect}, found {current or 'none'} "
                "(someone changed it first); re-read and retry"
            )
        stack = [str(v) for v in _json_tag(tags, TAG_STACK, [])]
        if action == "promote":
            if version is None:
                version = store.alias_version(client, name, rp.challenger_alias)
                if version is None:
                    logger.info(
                        "nothing to promote: %s has no @%s (production: %s)", name, rp.challenger_alias, current
                    )
                    return {"status": "noop", "production": current, "reason": f"no @{rp.challenger_alias}"}
            target = store.get_version(client, name, version=version)
            if str(target.version) == current:
                logger.info("version %s is already @%s; nothing to do", current, rp.production_alias)
                return {"status": "noop", "production": current, "reason": "already production"}
            production = store.get_version(client, name, version=current) if current else None
            verdict = check_candidate(target, production, thresholds)
            stack = (stack + [str(target.version)])[-STACK_LIMIT:]
        else:
            if len(stack) < 2:
                raise PromotionError(
                    f"nothing to roll back to: the production history of {name} has "
                    f"{len(stack)} entr{'y' if len(stack) == 1 else 'ies'}"
                )
            if stack[-1] != current:
                raise PromotionError(
                    f"@{rp.production_alias} is version {current} but the history says "
                    f"{stack[-1]}: it was moved outside lmpipe; use `lmpipe promote --version N`"
                )
            stack = stack[:-1]
            target = store.get_version(client, name, version=stack[-1])
            verdict = None
        # compare-and-set against other machines: the counter must not have moved meanwhile
        if int(_model_tags(client, name).get(TAG_SEQ, "0")) != seq:
            raise PromotionError("conflict: the production alias changed during this promotion; retry")
        entry = {
            "seq": seq + 1,
            "action": action,
            "model": name,
            "from": current,
            "to": str(target.version),
            "actor": actor(),
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "reason": reason,
            "registry": store.display_uri(uri),
        }
        client.set_registered_model_alias(name, rp.production_alias, target.version)
        client.set_registered_model_tag(name, TAG_SEQ, str(seq + 1))
        client.set_registered_model_tag(name, TAG_STACK, json.dumps(stack))
        history = (_json_tag(tags, TAG_HISTORY, []) + [entry])[-rp.history_tag_entries :]
        client.set_registered_model_tag(name, TAG_HISTORY, json.dumps(history))
        client.set_model_version_tag(name, target.version, f"lmpipe.{PAST[action]}_at", entry["when"])
        client.set_model_version_tag(name, target.version, f"lmpipe.{PAST[action]}_by", entry["actor"])
        if action == "promote" and store.alias_version(client, name, rp.challenger_alias) == str(target.version):
            client.delete_registered_model_alias(name, rp.challenger_alias)  # the challenger is champion now
        _append_history(registry_dir, entry)
        write_champion_metrics(champion_path, name, target)
    logger.info("%s: @%s %s -> %s (%s)", action, rp.production_alias, current, target.version, reason or "no reason")
    return {"status": PAST[action], **entry, **({"gates": verdict["summary"]} if verdict else {})}


# ---------------------------------------------------------------------------------------------
# CLI


def _load(args):
    return load_params(args.params, parse_overrides(args.overrides))


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", default=None, help="version to promote (default: the @challenger alias)")
    parser.add_argument(
        "--expect-production",
        default=None,
        metavar="N|none",
        help="compare-and-set: refuse unless production is currently this version",
    )
    parser.add_argument("--reason", default="", help="why (stored in the promotion history)")


def cli_promote(args: argparse.Namespace) -> int:
    result = change_production(
        _load(args), "promote", version=args.version, expect=args.expect_production, reason=args.reason
    )
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-production",
        default=None,
        metavar="N",
        help="compare-and-set: refuse unless production is currently this version",
    )
    parser.add_argument("--reason", default="", help="why (stored in the promotion history)")


def cli_rollback(args: argparse.Namespace) -> int:
    result = change_production(_load(args), "rollback", expect=args.expect_production, reason=args.reason)
    print(json.dumps(result, sort_keys=True, default=str))
    return 0
