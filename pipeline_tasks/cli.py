"""The one command line: ``python -m pipeline_tasks STAGE`` (also ``lmpipe STAGE``).

``dvc.yaml``, every Airflow container and every Kubeflow component call exactly this. It parses
arguments, configures logging once, loads and validates ``params.yaml`` (``--params``, ``-S
key=value`` overrides), runs the stage and maps domain errors to exit codes:

* 0 success, 1 stage error (message, no traceback), 2 configuration error,
  3 data validation failed, 4 model gates failed (see :mod:`pipeline_tasks.errors`),
  130 interrupted (Ctrl-C), 143 stopped by SIGTERM.

SIGTERM (``docker stop``, a Kubernetes pod deletion, an Airflow task kill) unwinds the command
like Ctrl-C, so the temporary outputs of :mod:`pipeline_tasks.artifacts` are removed on the way
out; ``pretrain`` replaces the handler while it trains, to checkpoint first.

A stage module provides ``run(params, **options)`` and optionally ``add_arguments(parser)``.
Other commands (``predict``, ``promote`` ...) provide ``add_<name>_arguments(parser)`` and
``cli_<name>(args) -> int``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from pipeline_tasks.config import ConfigError, load_params, load_yaml
from pipeline_tasks.errors import PipelineError
from pipeline_tasks.stages import COMMANDS, STAGES

logger = logging.getLogger("pipeline_tasks")

STAGE_HELP = {
    "ingest_wiki": "stream Wikipedia XML dumps to clean article text",
    "ingest_news": "read news CSV / JSONL / folders, clean and quarantine bad rows",
    "prepare": "merge, deduplicate (exact + MinHash) and split deterministically",
    "validate": "great-expectations suites on every prepared split",
    "tokenize": "train byte-level BPE and write token shards",
    "pretrain": "train the GPT / LSTM language model",
    "finetune": "news topic classifier on the pretrained model",
    "export": "ONNX export, int8 quantization, parity checks, bundle",
    "evaluate": "score variants, apply gates, write the model card",
    "monitor": "drift report of a news batch against the training reference",
    "register": "log the run and register a challenger in MLflow",
}
COMMAND_HELP = {
    "predict": "classify text with an exported ONNX bundle (no torch)",
    "promote": "move the production alias to a challenger that passed its gates",
    "rollback": "restore the previous production model",
    "kfp-compile": "compile the stages into a Kubeflow Pipelines YAML",
    "summary": "headline numbers of the last run, one line per stage",
}


class TerminatedError(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so ``except Exception`` lets it pass."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`TerminatedError` in the main thread."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    owner = os.getpid()
    received = []

    def on_sigterm(signum, _frame):
        if os.getpid() != owner:  # a forked worker (process pool, data loader) dies as it always did
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if received:  # a repeated SIGTERM must not cut the cleanup short
            return
        received.append(signum)
        raise TerminatedError(signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # third-party chatter that hides our own progress lines
    for noisy in ("great_expectations", "urllib3", "filelock", "matplotlib", "numexpr", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["pretrain.max_steps=5", "model.arch=lstm"]`` -> dict with YAML-typed values."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"-S {item!r}: expected KEY=VALUE, e.g. -S pretrain.max_steps=10")
        overrides[key.strip()] = load_yaml(value)
    return overrides


def _module(name: str):
    return importlib.import_module(f"pipeline_tasks.{name}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, help="params file (default: params.yaml or $LMPIPE_PARAMS)")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run, e.g. -S pretrain.max_steps=10",
    )
    parser.add_argument("--log-level", default=os.environ.get("LMPIPE_LOG_LEVEL", "INFO"))


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the ``selected`` command's module is imported for its arguments."""
    parser = argparse.ArgumentParser(prog="lmpipe", description="lm-pipeline: retrain, ship and watch a LM.")
    sub = parser.add_subparsers(dest="command", metavar="STAGE|COMMAND")
    for name in STAGES:
        stage_parser = sub.add_parser(name, help=STAGE_HELP.get(name, ""))
        _add_common(stage_parser)
        if name == selected:
            adder = getattr(_module(STAGES[name]), "add_arguments", None)
            if adder is not None:
                adder(stage_parser)
    for name, module_name in COMMANDS.items():
        cmd_parser = sub.add_parser(name, help=COMMAND_HELP.get(name, ""))
        _add_common(cmd_parser)
        if name == selected:
            getattr(_module(module_name), f"add_{name.replace('-', '_')}_arguments")(cmd_parser)
    return parser


def run_stage(name: str, args: argparse.Namespace) -> dict[str, Any]:
    params = load_params(args.params, parse_overrides(args.overrides))
    module = _module(STAGES[name])
    options = {k: v for k, v in vars(args).items() if k not in {"command", "params", "overrides", "log_level"}}
    # the same stage arguments, for stages that start copies of themselves (pretrain under torchrun)
    options["stage_argv"] = (
        *(("--params", args.params) if args.params else ()),
        *(arg for override in args.overrides for arg in ("-S", override)),
        "--log-level",
        args.log_level,
    )
    started = time.perf_counter()
    logger.info("stage %s: start", name)
    result = module.run(params, **options) or {}
    logger.info("stage %s: done in %.1f s", name, time.perf_counter() - started)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(selected if selected in STAGES or selected in COMMANDS else None)
    except ModuleNotFoundError as exc:
        print(f"lmpipe: command {selected!r} is not available in this environment: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    configure_logging(args.log_level)
    try:
        with sigterm_unwinds():
            if args.command in STAGES:
                result = run_stage(args.command, args)
                print(json.dumps(result, default=str, sort_keys=True))
                return 0
            module = _module(COMMANDS[args.command])
            return int(getattr(module, f"cli_{args.command.replace('-', '_')}")(args) or 0)
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    except PipelineError as exc:
        logger.error("%s failed: %s", args.command, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("%s interrupted", args.command)
        return 130
    except TerminatedError:
        logger.error("%s stopped by SIGTERM; its unfinished outputs were discarded", args.command)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
