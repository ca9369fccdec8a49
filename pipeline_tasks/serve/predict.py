"""``lmpipe predict``: classify headlines with an exported bundle, ONNX Runtime only (no torch).

Examples::

    lmpipe predict "Stocks rally as the Fed holds rates"
    lmpipe predict --file news.jsonl            # JSON lines with "text" or "title"/"description"
    lmpipe predict --file headlines.txt         # or plain text, one item per line
    lmpipe predict --bundle /srv/models/bundle --variant fp32 "..."
    lmpipe predict --model models:/lm-pipeline-news-classifier@production "..."   # from the MLflow registry

Prints one JSON object per input line on stdout: ``{"label", "probabilities", "text"}`` (plus
``"line"`` and ``"id"`` when reading a file). The bundle is verified (sha256 of every file)
before any session is created.

Which bundle: ``--bundle DIR``; otherwise ``paths.bundle_dir`` of the params file
(``--params`` / ``$LMPIPE_PARAMS`` / ``./params.yaml``, loaded with
:func:`pipeline_tasks.config.load_params`, which imports only the torch-free params modules);
otherwise ``models/bundle``. :func:`resolve_bundle_dir` is the single seam where a registry
reference (``models:/NAME@alias``) is turned into a local bundle directory.

Light on purpose: ONNX Runtime and the bundle (:mod:`pipeline_tasks.ship.bundle`) only, never
torch; mlflow is imported only to resolve a registry reference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pipeline_tasks.config import DEFAULT_PARAMS_FILE, PARAMS_FILE_ENV, PathsParams, load_params
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.jsonlines import parse_json_line
from pipeline_tasks.ship.bundle import dumps_line, load_bundle, record_text

logger = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"


def default_bundle_dir(params_file: str | None = None) -> Path:
    """``paths.bundle_dir`` from the params file when there is one, else ``models/bundle``."""
    candidate = Path(params_file or os.environ.get(PARAMS_FILE_ENV) or DEFAULT_PARAMS_FILE)
    if candidate.is_file():
        return Path(load_params(candidate).paths.bundle_dir)
    if params_file:
        raise DataError(f"params file {params_file} not found; pass --bundle DIR instead")
    return Path(PathsParams().bundle_dir)


def resolve_bundle_dir(reference: str | None, params_file: str | None = None) -> Path:
    """A local bundle directory for ``reference`` (a path, a ``models:/`` URI, or ``None``).

    ``models:/NAME@alias`` is delegated to :func:`pipeline_tasks.registry.store.resolve_model_bundle`
    (the MLflow registry lives there), which downloads/locates the bundle and returns its directory.
    """
    if reference is None:
        return default_bundle_dir(params_file)
    if reference.startswith(REGISTRY_SCHEME):
        try:  # imported here: the store imports mlflow, which serving from a bundle path must not need
            from pipeline_tasks.registry.store import resolve_model_bundle
        except ImportError as exc:
            raise DataError(
                f"{reference}: registry references need pipeline_tasks.registry.store ({exc}); pass --bundle DIR"
            ) from exc
        return Path(resolve_model_bundle(reference, params_file=params_file))
    return Path(reference)


def read_inputs(path: str | os.PathLike) -> Iterator[dict]:
    """Records from a JSON-lines file (``text`` or ``title``/``description``) or a plain text file.

    The format is decided per line: a line starting with ``{`` must be a JSON object with a
    text field (:func:`pipeline_tasks.ship.bundle.record_text`), anything else is taken as the
    text itself. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--file {path}: no such file")
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if not line.lstrip().startswith("{"):
                yield {"line": number, "text": line}
                continue
            where = f"{path}:{number}"
            record = parse_json_line(line, where)
            yield {
                "line": number,
                "text": record_text(record, where),
                **({"id": record["id"]} if "id" in record else {}),
            }


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="*", help="texts to classify (each argument is one text)")
    parser.add_argument("--file", help="JSON lines (text or title/description) or plain text, one per line; - = stdin")
    parser.add_argument("--bundle", default=None, help="bundle directory (default: paths.bundle_dir or models/bundle)")
    parser.add_argument(
        "--model",
        default=None,
        metavar="models:/NAME@ALIAS",
        help="serve a registered model version from the MLflow registry instead of --bundle",
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="fp32 | int8_dynamic | int8_static | fp16 (default: the bundle's serving variant)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0 = ORT default)")


def cli_predict(args: argparse.Namespace) -> int:
    if bool(args.text) == bool(args.file):
        raise DataError("give either texts as arguments or --file PATH (not both, not neither)")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model and args.bundle:
        raise DataError("give --bundle DIR or --model models:/NAME@ALIAS, not both")
    if args.model and not args.model.startswith(REGISTRY_SCHEME):
        raise DataError(f"--model {args.model!r}: expected models:/NAME@alias or models:/NAME/VERSION")
    bundle_dir = resolve_bundle_dir(args.model or args.bundle, args.params)
    bundle = load_bundle(bundle_dir, device=args.device, intra_op_threads=args.threads)
    variant = args.variant or bundle.default_variant
    logger.info("bundle %s, variant %s, device %s", bundle_dir, variant, args.device)
    if args.file == "-":
        records = [{"line": i, "text": t.rstrip("\n")} for i, t in enumerate(sys.stdin, 1) if t.strip()]
    elif args.file:
        records = list(read_inputs(args.file))
    else:
        records = [{"text": t} for t in args.text]
    count = 0
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        for record, result in zip(chunk, bundle.predict([r["text"] for r in chunk], variant)):
            print(dumps_line({**result, **record}))
            count += 1
    sys.stdout.flush()
    logger.info("predicted %d texts", count)
    return 0
