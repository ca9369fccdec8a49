"""Load, verify and run an exported model bundle with ONNX Runtime alone (no torch).

A bundle (written by ``lmpipe export`` into ``paths.bundle_dir``) is a self-contained folder::

    model_fp32.onnx  model_int8_dynamic.onnx  model_int8_static.onnx  model_fp16.onnx  lm_fp32.onnx
    tokenizer.json   labels.json   config.json   manifest.json

``manifest.json`` holds the sha256 of every other file (``outputs``), the library versions and
the opset. :func:`verify_bundle` checks every hash, refuses files the manifest does not list,
symlinks, and ONNX external-data references that are absolute, contain ``..`` or resolve
outside the bundle, so a tampered or hand-edited bundle never reaches a session.

:class:`Bundle` is the serving API used by ``predict``, ``evaluate``, ``monitor`` and the
benchmarks: tokenization exactly as in fine-tuning (:func:`encode_texts`), ORT sessions pinned to
the requested providers (:func:`make_session` fails loudly on a silent CPU fallback),
:meth:`Bundle.predict_proba`, :meth:`Bundle.embed` (the classifier's pooled hidden state, the
``pooled`` output of the same graph) and :meth:`Bundle.lm_logits`.

This module must never import torch: ``predict`` runs on images that only have onnxruntime,
onnx, numpy and tokenizers (tested in a subprocess where torch cannot be imported).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

from pipeline_tasks.artifacts import MANIFEST_NAME, read_json, sha256_file
from pipeline_tasks.errors import DataError, PipelineError
from pipeline_tasks.train.classifier_data import encode_texts as encode_ids
from pipeline_tasks.train.classifier_data import pad_batch

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
CONFIG_NAME = "config.json"
LABELS_NAME = "labels.json"
TOKENIZER_NAME = "tokenizer.json"
VARIANT_FILES: dict[str, str] = {
    "fp32": "model_fp32.onnx",
    "int8_dynamic": "model_int8_dynamic.onnx",
    "int8_static": "model_int8_static.onnx",
    "fp16": "model_fp16.onnx",
}
LM_FILE = "lm_fp32.onnx"
REQUIRED_FILES = (CONFIG_NAME, LABELS_NAME, TOKENIZER_NAME)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDERS = {"cpu": [CPU], "cuda": [CUDA, CPU]}


class BundleError(PipelineError):
    """A bundle is missing, incomplete, tampered with, or cannot be run as asked."""


# ---------------------------------------------------------------------------------------------
# verification


def _onnx_tensors(graph) -> Iterable[Any]:
    """Every TensorProto of a graph, including sparse initializers and subgraph attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from _onnx_tensors(sub)


def check_external_data(
    model_path: str | os.PathLike, bundle_dir: str | os.PathLike, allowed: Iterable[str] | None = None
) -> list[str]:
    """Refuse external-data references that leave ``bundle_dir``; return the referenced files.

    ``allowed`` (posix paths relative to the bundle) additionally restricts references to files
    the manifest lists, so an unverified file can never be read as weights.
    """
    model_path, root = Path(model_path), Path(bundle_dir).resolve()
    model = onnx.load(str(model_path), load_external_data=False)
    allowed_set = set(allowed) if allowed is not None else None
    referenced = []
    for tensor in _onnx_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        location = entries.get("location", "")
        where = f"{model_path.name}: initializer {tensor.name!r} external data location {location!r}"
        if (
            not location
            or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive
        ):
            raise BundleError(f"{where} is absolute or empty; a bundle may only reference files inside itself")
        if ".." in PurePosixPath(location.replace("\\", "/")).parts:
            raise BundleError(f"{where} contains '..'; a bundle may only reference files inside itself")
        target = (model_path.parent / location).resolve()
        if not target.is_relative_to(root):
            raise BundleError(f"{where} resolves to {target}, outside the bundle {root}")
        rel = target.relative_to(root).as_posix()
        if not target.is_file():
            raise BundleError(f"{where}: file {rel} is missing from the bundle")
        if allowed_set is not None and rel not in allowed_set:
            raise BundleError(f"{where}: file {rel} is not listed in {MANIFEST_NAME}, refusing unverified weights")
        referenced.append(rel)
    return sorted(set(referenced))


def verify_bundle(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file's sha256 against ``manifest.json`` and every ONNX file's external data.

    Returns the manifest. Raises :class:`BundleError` naming the file and the fix.
    """
    root = Path(bundle_dir)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle {root} not found: run `lmpipe export` (or `dvc repro export`) or pass --bundle DIR")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} missing: not an exported bundle (re-run `lmpipe export`)")
    try:
        manifest = read_json(manifest_path)
        expected: dict[str, str] = dict(manifest["outputs"])
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc}); re-run `lmpipe export`") from exc
    for name in REQUIRED_FILES:
        if name not in expected:
            raise BundleError(f"{manifest_path}: required file {name} is not listed; re-run `lmpipe export`")
    present = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise BundleError(f"{root}: {rel} is a symlink; bundles must be self-contained plain files")
        if path.is_file() and rel != MANIFEST_NAME:
            present[rel] = path
    unlisted = sorted(set(present) - set(expected))
    if unlisted:
        raise BundleError(f"{root}: files not in {MANIFEST_NAME}: {unlisted}; the bundle was modified after export")
    for rel, digest in expected.items():
        if rel not in present:
            raise BundleError(f"{root}: {rel} listed in {MANIFEST_NAME} is missing; re-run `lmpipe export`")
        actual = sha256_file(present[rel])
        if actual != digest:
            raise BundleError(
                f"{root / rel}: sha256 {actual[:12]}... does not match the manifest ({digest[:12]}...): "
                "the file was changed after export; re-export or restore the bundle"
            )
    for rel in expected:
        if rel.endswith(".onnx"):
            check_external_data(root / rel, root, allowed=expected)
    return manifest


# ---------------------------------------------------------------------------------------------
# tokenization: exactly finetune's rule (pipeline_tasks.train.classifier_data), so served inputs match training


def length_order(texts: Sequence[str]) -> np.ndarray:
    """Indices of ``texts`` from shortest to longest (stable): batches of similar length pad little."""
    return np.argsort(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)), kind="stable")


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, pad_id: int, cls_id: int | None):
    """Token ids and attention mask, right-padded to the longest row (numpy int64, [B, T]).

    Delegates to :func:`pipeline_tasks.train.classifier_data.encode_texts` / ``pad_batch`` (first
    ``max_len`` tokens, ``max_len - 1`` plus a trailing ``cls_id`` when the classifier has one).
    Serving must not crash on an empty text: it becomes a single pad token.
    """
    seqs = [
        s if len(s) else np.asarray([pad_id], dtype=np.int64)
        for s in encode_ids(tokenizer, list(texts), max_len, cls_id)
    ]
    return pad_batch(seqs, pad_id)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime sessions


def make_session(
    model_path: str | os.PathLike, device: str = "cpu", intra_op_threads: int = 0, inter_op_threads: int = 1
):
    """An ``InferenceSession`` on exactly the requested device.

    onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU;
    for ``device="cuda"`` we compare ``get_providers()`` and raise instead of timing the wrong
    thing. ``intra_op_threads=0`` lets ORT choose; benchmarks pin it (params) to cut noise.
    """
    if device not in PROVIDERS:
        raise BundleError(f"device {device!r}: expected one of {sorted(PROVIDERS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(intra_op_threads)
    options.inter_op_num_threads = int(inter_op_threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT warnings about unused initializers etc. drown our logs
    session = ort.InferenceSession(str(model_path), sess_options=options, providers=PROVIDERS[device])
    active = session.get_providers()
    if active[0] != PROVIDERS[device][0]:
        raise BundleError(
            f"{Path(model_path).name}: asked for {PROVIDERS[device][0]} but ONNX Runtime is running on "
            f"{active} (no usable GPU / CUDA libraries?); use --device cpu"
        )
    return session


# ---------------------------------------------------------------------------------------------
# the bundle


class Bundle:
    """A verified bundle with lazily created tokenizer and sessions."""

    def __init__(
        self, bundle_dir: str | os.PathLike, verify: bool = True, device: str = "cpu", intra_op_threads: int = 0
    ):
        self.dir = Path(bundle_dir)
        self.manifest = verify_bundle(self.dir) if verify else read_json(self.dir / MANIFEST_NAME)
        self.config: dict[str, Any] = read_json(self.dir / CONFIG_NAME)
        if self.config.get("format_version") != BUNDLE_FORMAT:
            raise BundleError(
                f"{self.dir / CONFIG_NAME}: bundle format {self.config.get('format_version')!r}, "
                f"this code reads format {BUNDLE_FORMAT}; re-export with this version"
            )
        self.labels: list[str] = list(read_json(self.dir / LABELS_NAME))
        self.device = device
        self.intra_op_threads = intra_op_threads
        self._tokenizer = None
        self._sessions: dict[str, Any] = {}

    # -- metadata
    @property
    def default_variant(self) -> str:
        return self.config["default_variant"]

    @property
    def variants(self) -> list[str]:
        return sorted(self.config["variants"])

    @property
    def max_len(self) -> int:
        return int(self.config["max_len"])

    def variant_path(self, variant: str | None = None) -> Path:
        variant = variant or self.default_variant
        if variant not in self.config["variants"]:
            raise BundleError(f"variant {variant!r} is not in bundle {self.dir} (has {self.variants})")
        return self.member(self.config["variants"][variant]["file"])

    def member(self, name: str) -> Path:
        """A file of this bundle named by config.json, refused unless the manifest lists it (no ``..`` tricks)."""
        if name not in self.manifest.get("outputs", {}) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{self.dir / CONFIG_NAME} names {name!r}, which is not a verified file of the bundle")
        return self.dir / name

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(str(self.dir / TOKENIZER_NAME))
        return self._tokenizer

    def session(self, variant: str | None = None):
        variant = variant or self.default_variant
        if variant not in self._sessions:
            info = self.config["variants"].get(variant, {})
            if self.device == "cpu" and info.get("cpu_runnable") is False:
                raise BundleError(
                    f"variant {variant!r} does not run on the CPU execution provider "
                    f"({info.get('note', 'see parity.json')}); use --device cuda"
                )
            self._sessions[variant] = make_session(self.variant_path(variant), self.device, self.intra_op_threads)
        return self._sessions[variant]

    # -- inference
    def encode(self, texts: Sequence[str]):
        cls = self.config["classifier"]
        return encode_texts(self.tokenizer, texts, self.max_len, int(cls["pad_id"]), cls.get("cls_id"))

    def run(self, input_ids, attention_mask, variant: str | None = None) -> dict[str, Any]:
        """Raw graph outputs (``logits``, ``pooled``) for already-encoded inputs."""
        session = self.session(variant)
        names = [o.name for o in session.get_outputs()]
        values = session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return dict(zip(names, values))

    def _batched(
        self, texts: Sequence[str], output: str, variant: str | None, batch_size: int, width: int, session=None
    ):
        """``output`` of every text in input order; batches hold texts of similar length.

        Each batch is padded to its longest row, so batching by length (characters as the proxy)
        cuts the padded positions the graph computes: about half the time on a test set.
        ``session``: another graph with the bundle's inputs (evaluate's teacher of a student).
        """
        out = np.zeros((len(texts), width), np.float32)
        order = length_order(texts)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = self.encode([texts[j] for j in idx])
            if session is None:
                out[idx] = self.run(ids, mask, variant=variant)[output]
            else:
                out[idx] = session.run([output], {"input_ids": ids, "attention_mask": mask})[0]
        return out

    def logits(self, texts: Sequence[str], variant: str | None = None, batch_size: int = 32, session=None):
        return self._batched(texts, "logits", variant, batch_size, len(self.labels), session)

    def predict_proba(self, texts: Sequence[str], variant: str | None = None, batch_size: int = 32):
        """Class probabilities [N, num_classes] in the order of :attr:`labels`."""
        return softmax(self.logits(texts, variant, batch_size))

    def predict(self, texts: Sequence[str], variant: str | None = None, batch_size: int = 32) -> list[dict]:
        probs = self.predict_proba(texts, variant, batch_size)
        return [
            {
                "label": self.labels[int(p.argmax())],
                "probabilities": {lab: round(float(v), 6) for lab, v in zip(self.labels, p)},
            }
            for p in probs
        ]

    def embed(self, texts: Sequence[str], variant: str = "fp32", batch_size: int = 64):
        """Pooled hidden state [N, hidden] of the fine-tuned model (for drift monitoring)."""
        return self._batched(texts, "pooled", variant, batch_size, int(self.config["hidden_size"]))

    def lm_session(self):
        if self.config.get("lm") is None:
            raise BundleError(f"bundle {self.dir} has no language model (export.export_lm was false)")
        if "lm" not in self._sessions:
            self._sessions["lm"] = make_session(
                self.member(self.config["lm"]["file"]), self.device, self.intra_op_threads
            )
        return self._sessions["lm"]

    def lm_logits(self, input_ids):
        """Next-token logits [B, T, vocab] of the pretrained LM for int64 ids [B, T]."""
        return self.lm_session().run(["logits"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]


def softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def load_bundle(bundle_dir: str | os.PathLike, device: str = "cpu", intra_op_threads: int = 0) -> Bundle:
    """Verify and open a bundle (the one entry point other stages should use)."""
    return Bundle(bundle_dir, verify=True, device=device, intra_op_threads=intra_op_threads)


def bundle_summary(bundle_dir: str | os.PathLike) -> dict[str, Any]:
    """Small JSON-able description of a bundle (files, sizes, default variant, versions)."""
    root = Path(bundle_dir)
    config = read_json(root / CONFIG_NAME)
    manifest = read_json(root / MANIFEST_NAME)
    return {
        "bundle_dir": str(root),
        "default_variant": config["default_variant"],
        "variants": {
            v: {"file": info["file"], "bytes": (root / info["file"]).stat().st_size}
            for v, info in config["variants"].items()
        },
        "opset": config.get("opset"),
        "libraries": manifest.get("libraries", {}),
    }


def dumps_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=False)


def record_text(record: dict, where: str) -> str:
    """The classifier's input text, built as ingest_news builds ``text``: title, newline, body.

    The serving input contract, shared by ``lmpipe predict --file`` and the drift monitor's batches;
    ``where`` (``file:line``) names the record in the error.
    """
    if isinstance(record.get("text"), str) and record["text"].strip():
        return record["text"]
    title = record.get("title") or record.get("headline") or ""
    body = record.get("description") or record.get("short_description") or ""
    if not (isinstance(title, str) and isinstance(body, str)) or not (title.strip() or body.strip()):
        raise DataError(f"{where}: record has no 'text' and no 'title'/'description'; keys: {sorted(record)}")
    return "\n".join(part for part in (title.strip(), body.strip()) if part)
