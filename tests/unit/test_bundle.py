"""Bundle verification (sha256, unlisted files, external data), tokenization and provider checks.

The bundles here are hand-built: a real two-node ONNX graph (onnx.helper) saved with or without
external data, a real BPE tokenizer trained on a few lines, and a manifest written by
``pipeline_tasks.artifacts.write_manifest`` exactly as ``export`` writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline_tasks.artifacts import write_manifest
from pipeline_tasks.ship.bundle import BundleError, check_external_data, encode_texts, make_session, verify_bundle

TEXTS = [
    "Stocks rally as the Fed holds rates",
    "Late goal sends United through to the final",
    "New chip promises faster phones",
    "Talks resume after border clash",
] * 20


def _tokenizer():
    from pipeline_tasks.dataset.tokenize import train_tokenizer

    return train_tokenizer(
        iter([TEXTS]), vocab_size=300, min_frequency=1, special_tokens=("<|endoftext|>", "<|pad|>", "<|cls|>")
    )


def _onnx_model(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _make_bundle(root: Path, external: bool = False) -> Path:
    import onnx

    root.mkdir(parents=True)
    model = _onnx_model(np.arange(16, dtype=np.float32).reshape(4, 4))
    if external:
        onnx.save(
            model, str(root / "model_fp32.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0
        )
    else:
        onnx.save(model, str(root / "model_fp32.onnx"))
    _tokenizer().save(str(root / "tokenizer.json"))
    (root / "labels.json").write_text(json.dumps(["a", "b"]))
    (root / "config.json").write_text(json.dumps({"format_version": 1}))
    write_manifest(root, "export", {"test": True})
    return root


def _point_external_data_at(model_path: Path, location: str) -> None:
    """Rewrite every external-data location in place (what an attacker would do)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(model_path))


def _refresh_manifest(root: Path) -> None:
    (root / "manifest.json").unlink()
    write_manifest(root, "export", {"test": True})


def test_verify_bundle_accepts_untouched_bundle(tmp_path):
    root = _make_bundle(tmp_path / "b")
    manifest = verify_bundle(root)
    assert set(manifest["outputs"]) == {"model_fp32.onnx", "tokenizer.json", "labels.json", "config.json"}


def test_verify_bundle_accepts_external_data_inside_bundle(tmp_path):
    root = _make_bundle(tmp_path / "b", external=True)
    assert check_external_data(root / "model_fp32.onnx", root) == ["weights.bin"]
    verify_bundle(root)


def test_verify_bundle_rejects_changed_bytes(tmp_path):
    root = _make_bundle(tmp_path / "b")
    data = bytearray((root / "model_fp32.onnx").read_bytes())
    data[-1] ^= 0xFF
    (root / "model_fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model_fp32.onnx: sha256 .* does not match"):
        verify_bundle(root)


def test_verify_bundle_rejects_changed_external_weights(tmp_path):
    root = _make_bundle(tmp_path / "b", external=True)
    (root / "weights.bin").write_bytes(b"\0" * (root / "weights.bin").stat().st_size)
    with pytest.raises(BundleError, match="weights.bin: sha256"):
        verify_bundle(root)


def test_verify_bundle_rejects_unlisted_and_missing_files(tmp_path):
    root = _make_bundle(tmp_path / "b")
    (root / "extra.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="files not in manifest.json: \\['extra.onnx'\\]"):
        verify_bundle(root)
    (root / "extra.onnx").unlink()
    (root / "labels.json").unlink()
    with pytest.raises(BundleError, match="labels.json listed in manifest.json is missing"):
        verify_bundle(root)


def test_verify_bundle_names_missing_bundle_and_manifest(tmp_path):
    with pytest.raises(BundleError, match="not found: run `lmpipe export`"):
        verify_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json missing"):
        verify_bundle(tmp_path / "empty")


@pytest.mark.parametrize("location", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd", "C:\\weights.bin"])
def test_external_data_outside_bundle_is_refused(tmp_path, location):
    root = _make_bundle(tmp_path / "b", external=True)
    (tmp_path / "outside.bin").write_bytes((root / "weights.bin").read_bytes())
    _point_external_data_at(root / "model_fp32.onnx", location)
    _refresh_manifest(root)  # a consistent manifest must not make an escaping path acceptable
    with pytest.raises(BundleError, match="may only reference files inside itself"):
        verify_bundle(root)


def test_external_data_through_symlink_is_refused(tmp_path):
    root = _make_bundle(tmp_path / "b", external=True)
    (tmp_path / "outside.bin").write_bytes((root / "weights.bin").read_bytes())
    os.symlink(tmp_path / "outside.bin", root / "link.bin")
    _point_external_data_at(root / "model_fp32.onnx", "link.bin")
    with pytest.raises(BundleError, match="outside the bundle"):
        check_external_data(root / "model_fp32.onnx", root)
    with pytest.raises(BundleError, match="symlink"):
        verify_bundle(root)


def test_external_data_not_in_manifest_is_refused(tmp_path):
    root = _make_bundle(tmp_path / "b", external=True)
    with pytest.raises(BundleError, match="not listed in manifest.json"):
        check_external_data(root / "model_fp32.onnx", root, allowed={"model_fp32.onnx"})


def test_encode_texts_right_pads_and_appends_cls():
    tok = _tokenizer()
    pad, cls = tok.token_to_id("<|pad|>"), tok.token_to_id("<|cls|>")
    ids, mask = encode_texts(tok, ["New chip", TEXTS[0] * 5, ""], max_len=12, pad_id=pad, cls_id=cls)
    assert ids.dtype == np.int64 and ids.shape == (3, 12)
    lengths = mask.sum(1)
    assert lengths[1] == 12 and ids[1, 11] == cls  # truncated, CLS kept last
    assert ids[0, lengths[0] - 1] == cls and (ids[0, lengths[0] :] == pad).all() and not mask[0, lengths[0] :].any()
    assert lengths[2] == 1  # an empty text still has one attended position
    ids, mask = encode_texts(tok, ["New chip"], max_len=12, pad_id=pad, cls_id=None)
    assert cls not in ids and mask.all()


def test_encode_texts_matches_finetune_encoding():
    from pipeline_tasks.train.classifier_data import encode_texts as finetune_encode

    tok = _tokenizer()
    cls = tok.token_to_id("<|cls|>")
    ids, mask = encode_texts(tok, TEXTS[:4], max_len=8, pad_id=0, cls_id=cls)
    for row, m, expected in zip(ids, mask, finetune_encode(tok, TEXTS[:4], 8, cls)):
        assert row[m.astype(bool)].tolist() == expected.tolist()


def test_make_session_refuses_silent_cuda_fallback(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA session is real here")
    root = _make_bundle(tmp_path / "b")
    assert make_session(root / "model_fp32.onnx", "cpu").get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="asked for CUDAExecutionProvider but ONNX Runtime is running on"):
        make_session(root / "model_fp32.onnx", "cuda")


def test_bundle_refuses_config_pointing_outside(tmp_path):
    from pipeline_tasks.ship.bundle import Bundle

    root = _make_bundle(tmp_path / "b")
    (root / "config.json").write_text(
        json.dumps({"format_version": 1, "default_variant": "fp32", "variants": {"fp32": {"file": "../evil.onnx"}}})
    )
    _refresh_manifest(root)  # even a consistent manifest cannot make config.json point outside
    bundle = Bundle(root)
    with pytest.raises(BundleError, match="not a verified file of the bundle"):
        bundle.variant_path("fp32")
