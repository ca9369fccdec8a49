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

Inputs (:data:`INPUT_RULES`, also shown by ``lmpipe predict --help``): ``--file PATH`` and
``--file -`` (stdin) follow one rule, decided per line by :func:`parse_input_line`. Every input
is checked before anything is classified, and the run is refused (exit 1, nothing on stdout) when
any line is not UTF-8, not a JSON object or has no text, naming each bad line as ``FILE:LINE``
(``<stdin>:LINE``): a partial output would no longer line up with its input. "No text" is
prepare's ``empty_text`` rule (:func:`pipeline_tasks.dataset.textstats.normalize_key` is empty:
no letter or digit), so the model is never asked about inputs it never saw in training.

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
from collections.abc import Iterable, Sequence
from pathlib import Path

from pipeline_tasks.config import DEFAULT_PARAMS_FILE, PARAMS_FILE_ENV, PathsParams, load_params
from pipeline_tasks.dataset.textstats import normalize_key
from pipeline_tasks.errors import DataError
from pipeline_tasks.ingest.jsonlines import parse_json_line
from pipeline_tasks.ship.bundle import dumps_line, load_bundle, record_text

logger = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"
STDIN = "-"
STDIN_NAME = "<stdin>"
MAX_LISTED_PROBLEMS = 10  # enough to see the pattern; the count says how many more

INPUT_RULES = """\
inputs:
  TEXT ...        each argument is one text
  --file PATH     one input per line, UTF-8; --file - reads the same format from stdin

  A line that starts with "{" is a JSON object with "text" (or "title"/"description",
  joined by a newline as ingest builds text; an "id" is copied to the output); any other
  line is the text itself. Blank lines are skipped.

  Every input is checked before anything is classified. A line that is not UTF-8, a "{"
  line that is not a JSON object, or an input with no text to classify (empty, blank or
  punctuation only: prepare drops such rows as empty_text) refuses the whole run with exit 1 and nothing on stdout, naming
  each bad line as FILE:LINE (<stdin>:LINE) or "text argument N".

output:
  one JSON object per input on stdout: label, probabilities, text (+ line and id from --file).

  Long texts are truncated to the model's length: only their first max_len tokens
  (config.json of the bundle, params finetune.max_len) are classified, the rest is ignored.
"""


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


def read_inputs(path: str | os.PathLike) -> list[dict]:
    """Records from ``path`` (``-`` = stdin, read as bytes) under :data:`INPUT_RULES`."""
    if str(path) == STDIN:
        # bytes, not sys.stdin: the text layer of stdin smuggles undecodable bytes in as lone
        # surrogates (surrogateescape under a C/UTF-8 locale), which the tokenizer rejects
        return parse_input_lines(sys.stdin.buffer, STDIN_NAME)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--file {path}: no such file")
    with open(path, "rb") as fh:
        return parse_input_lines(fh, str(path))


def parse_input_lines(lines: Iterable[bytes], name: str) -> list[dict]:
    """``{"line", "text"[, "id"]}`` for every non-blank line, or a :class:`DataError` naming every bad line."""
    records, problems, inputs = [], [], 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        inputs += 1
        where = f"{name}:{number}"
        try:
            # utf-8-sig on the first line: a byte order mark would hide the "{" of a JSON line
            line = decode_utf8(raw, where, "utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            records.append(parse_input_line(line, number, where))
        except DataError as exc:
            problems.append(str(exc))
    if not inputs:
        raise DataError(f"{name}: no text to classify (the input is empty or has only blank lines)")
    if problems:
        raise refusal(name, problems, inputs)
    return records


def decode_utf8(raw: bytes, where: str, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            "save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT"
        ) from None


def parse_input_line(line: str, number: int, where: str) -> dict:
    """One input line: a JSON object when it starts with ``{``, else the text itself."""
    if not line.lstrip().startswith("{"):
        return {"line": number, "text": require_text(line, where)}
    record = parse_json_line(line, where)
    text = require_text(record_text(record, where), where)
    return {"line": number, "text": text, **({"id": record["id"]} if "id" in record else {})}


def require_text(text: str, where: str) -> str:
    """``text`` unless it is empty by prepare's ``empty_text`` rule (no letter or digit)."""
    if not normalize_key(text):
        raise DataError(f"{where}: no text to classify (empty, blank or punctuation only)")
    return text


def text_arguments(texts: Sequence[str]) -> list[dict]:
    """The positional texts as records, or a :class:`DataError` naming every unusable argument."""
    records, problems = [], []
    for number, text in enumerate(texts, start=1):
        where = f"text argument {number}"
        try:
            records.append({"text": require_text(require_utf8(text, where), where)})
        except DataError as exc:
            problems.append(str(exc))
    if problems:
        raise refusal("arguments", problems, len(texts))
    return records


def require_utf8(text: str, where: str) -> str:
    """``text`` unless it carries bytes that were not UTF-8 (lone surrogates from ``surrogateescape``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00  # surrogateescape maps byte b to U+DC00 + b
        detail = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else f"code point U+{ord(text[exc.start]):04X}"
        raise DataError(f"{where}: not valid UTF-8 ({detail} at character {exc.start + 1}); pass UTF-8 text") from None
    return text


def refusal(name: str, problems: list[str], inputs: int) -> DataError:
    if len(problems) == 1:
        return DataError(f"{problems[0]}; nothing was classified")
    listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    return DataError(
        f"{name}: {len(problems)} of {inputs} inputs cannot be classified, nothing was classified:\n  {listed}{more}"
    )


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Classify news texts with an exported bundle (ONNX Runtime only, no torch)."
    parser.epilog = INPUT_RULES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the rules' line breaks
    parser.add_argument("text", nargs="*", help="texts to classify (each argument is one text)")
    parser.add_argument(
        "--file", metavar="PATH", help="one input per line, JSON or plain text (see inputs below); - = stdin"
    )
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
    # inputs before the bundle: a bad input is refused without paying for sessions (or a registry download)
    records = read_inputs(args.file) if args.file else text_arguments(args.text)
    bundle_dir = resolve_bundle_dir(args.model or args.bundle, args.params)
    bundle = load_bundle(bundle_dir, device=args.device, intra_op_threads=args.threads)
    variant = args.variant or bundle.default_variant
    logger.info(
        "bundle %s, variant %s, device %s; texts longer than %d tokens are truncated",
        bundle_dir,
        variant,
        args.device,
        bundle.max_len,
    )
    count = 0
    for start in range(0, len(records), args.batch_size):
        chunk = records[start : start + args.batch_size]
        for record, result in zip(chunk, bundle.predict([r["text"] for r in chunk], variant)):
            print(dumps_line({**result, **record}))
            count += 1
    sys.stdout.flush()
    logger.info("predicted %d texts", count)
    return 0
