"""Stage ``export`` on a tiny real project: bundle layout, parity with PyTorch, int8 agreement, causality.

The project (real AG News + HuffPost rows, real tokenizer, real GPT / LSTM trained for a few
seconds) comes from ``_export_project.py`` and is built once per session.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline_tasks.errors import PipelineError
from pipeline_tasks.ship.bundle import VARIANT_FILES, load_bundle, verify_bundle

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared tiny project, with or without __init__.py
from _export_project import build_tiny_project, export_bundle  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpt(tmp_path_factory, corpora):
    project = build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "gpt")
    export_bundle(project)
    return project


def _torch_logits(project, input_ids, mask):
    import torch

    from pipeline_tasks.train.model import load_classifier

    model, _ = load_classifier(project.path("finetune_dir") / "model.pt")
    with torch.no_grad():
        return model(torch.from_numpy(input_ids), torch.from_numpy(mask)).numpy()


def test_export_writes_verified_self_contained_bundle(gpt):
    import onnx

    bundle_dir = gpt.path("bundle_dir")
    names = {p.name for p in bundle_dir.iterdir()}
    assert names == {
        *VARIANT_FILES.values(),
        "lm_fp32.onnx",
        "tokenizer.json",
        "labels.json",
        "config.json",
        "manifest.json",
    }
    manifest = verify_bundle(bundle_dir)
    assert set(manifest["outputs"]) == names - {"manifest.json"}
    assert manifest["opset"] == 18 and {"onnx", "torch"} <= set(manifest["libraries"])
    assert any(k.startswith("onnxruntime") for k in manifest["libraries"])
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["default_variant"] == "int8_dynamic" and config["opset"] == 18
    assert config["labels"] == json.loads((bundle_dir / "labels.json").read_text())
    for name in ("model_fp32.onnx", "lm_fp32.onnx"):
        model = onnx.load(str(bundle_dir / name))
        onnx.checker.check_model(model, full_check=True)
        dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
        assert all(d == ["batch", "seq"] for d in dims.values()), dims


def test_export_fp32_matches_torch_at_several_lengths_with_padding(gpt):
    report = json.loads((gpt.path("export_reports_dir") / "parity.json").read_text())
    assert report["passed"] and not report["failures"]
    lengths = report["classifier"]["seq_lens"]
    assert {"8", "32", "64", "single_row", "shortest_with_longest"} <= set(lengths)
    assert lengths["64"]["padded_rows"] > 0 and lengths["shortest_with_longest"]["padded_rows"] == 1
    assert all(v["max_abs_diff"] <= 1e-4 for v in lengths.values())
    # an independent check at shapes the export never saw: batch 1 x 5 tokens, batch 7 with padding
    bundle = load_bundle(gpt.path("bundle_dir"))
    texts = ["Oil prices jump", *[t for t in _test_texts(gpt)[:6]]]
    for batch in (texts[:1], texts):
        ids, mask = bundle.encode(batch)
        if len(batch) == 1:
            ids, mask = ids[:, :5], mask[:, :5]
        onnx_logits = bundle.run(ids, mask, "fp32")["logits"]
        assert np.abs(onnx_logits - _torch_logits(gpt, ids, mask)).max() <= 1e-4


def _test_texts(project):
    import pandas as pd

    return pd.read_parquet(project.path("prepared_dir") / "test.parquet")["text"].tolist()


def test_export_int8_agrees_with_fp32_on_test_rows(gpt):
    bundle = load_bundle(gpt.path("bundle_dir"))
    texts = _test_texts(gpt)
    fp32 = bundle.predict_proba(texts, "fp32").argmax(1)
    for variant in ("int8_dynamic", "int8_static"):
        agreement = float((bundle.predict_proba(texts, variant).argmax(1) == fp32).mean())
        print(f"{variant} agreement with fp32 on {len(texts)} test rows: {agreement:.4f}")
        if variant == "int8_dynamic":  # the serving variant carries the quality bar
            assert agreement >= 0.98
    sizes = {v: (gpt.path("bundle_dir") / f).stat().st_size for v, f in VARIANT_FILES.items()}
    assert sizes["int8_dynamic"] <= 0.35 * sizes["fp32"]
    assert sizes["fp16"] < 0.7 * sizes["fp32"]


def test_export_pooled_output_is_the_classifier_embedding(gpt):
    import torch

    from pipeline_tasks.ship.export import classifier_graph
    from pipeline_tasks.train.model import load_classifier

    bundle = load_bundle(gpt.path("bundle_dir"))
    texts = _test_texts(gpt)[:16]
    pooled = bundle.embed(texts)
    assert pooled.shape == (16, bundle.config["hidden_size"])
    model, _ = load_classifier(gpt.path("finetune_dir") / "model.pt")
    ids, mask = bundle.encode(texts)
    with torch.no_grad():
        logits, ref = classifier_graph(model)(torch.from_numpy(ids), torch.from_numpy(mask))
        assert np.abs(pooled - ref.numpy()).max() <= 1e-4
        assert torch.allclose(model.head(ref), model(torch.from_numpy(ids), torch.from_numpy(mask)))


def test_export_lm_is_causal_and_matches_torch(gpt):
    import torch

    from pipeline_tasks.train.model import load_lm

    bundle = load_bundle(gpt.path("bundle_dir"))
    rng = np.random.default_rng(0)
    vocab = bundle.config["lm"]["model_config"]["vocab_size"]
    x = rng.integers(0, vocab, size=(2, 40))
    changed = x.copy()
    changed[:, 20:] = rng.integers(0, vocab, size=(2, 20))
    a, b = bundle.lm_logits(x), bundle.lm_logits(changed)
    assert a.shape == (2, 40, vocab)
    assert np.abs(a[:, :20] - b[:, :20]).max() <= 1e-5
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3
    lm, _ = load_lm(gpt.path("pretrain_dir") / "model.pt")
    with torch.no_grad():
        assert np.abs(lm(torch.from_numpy(x))[0].numpy() - a).max() <= 1e-4
    causality = json.loads((gpt.path("export_reports_dir") / "parity.json").read_text())["lm"]["causality"]
    assert causality["max_change_before"] <= 1e-4 < causality["max_change_after"]


def test_export_parity_failure_fails_and_keeps_previous_bundle(gpt, tmp_path):
    from pipeline_tasks.ship import export

    bundle_dir, reports = tmp_path / "bundle", tmp_path / "reports"
    shutil.copytree(gpt.path("bundle_dir"), bundle_dir)
    before = (bundle_dir / "manifest.json").read_bytes()
    params = gpt.params(
        paths={**gpt.raw["paths"], "bundle_dir": str(bundle_dir), "export_reports_dir": str(reports)},
        export={"fp32_atol": 1e-12, "export_lm": False, "parity_rows": 32, "calibration_rows": 16},
    )
    with pytest.raises(PipelineError, match=r"fp32 ONNX differs from PyTorch: max \|logit diff\| [0-9.e-]+"):
        export.run(params)
    assert (bundle_dir / "manifest.json").read_bytes() == before
    verify_bundle(bundle_dir)
    report = json.loads((reports / "parity.json").read_text())
    assert report["passed"] is False and report["failures"]


def test_export_lstm_bundle_passes_parity(tmp_path_factory, corpora):
    project = build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "lstm")
    summary = export_bundle(project)
    assert summary["fp32_max_abs_diff"] <= 1e-4 and summary["int8_dynamic_agreement"] >= 0.98
    report = json.loads((project.path("export_reports_dir") / "parity.json").read_text())
    assert report["lm"]["causality"]["max_change_before"] <= 1e-4
    bundle = load_bundle(project.path("bundle_dir"))
    for shape in ((1, 3), (5, 64)):  # second and third shapes: sequence axis is dynamic for the LSTM too
        ids = np.random.default_rng(0).integers(3, 1000, size=shape)
        mask = np.ones_like(ids)
        assert np.abs(bundle.run(ids, mask, "fp32")["logits"] - _torch_logits(project, ids, mask)).max() <= 1e-4
        assert bundle.lm_logits(ids).shape[:2] == shape


def test_export_params_reject_bad_values():
    from pipeline_tasks.ship.params import ExportParams

    with pytest.raises(ValueError, match="opset"):
        ExportParams(opset=5)
    with pytest.raises(ValueError, match="min_int8_agreement"):
        ExportParams(min_int8_agreement=1.5)
