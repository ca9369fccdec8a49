"""``lmpipe predict`` from an exported bundle alone, in a clean subprocess where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared tiny project, with or without __init__.py
from _export_project import build_tiny_project, export_bundle  # noqa: E402

pytestmark = pytest.mark.slow

# torch is made unimportable before anything else runs: predict must live on onnxruntime alone
NO_TORCH = "import sys; sys.modules['torch'] = None; from pipeline_tasks.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def project(tmp_path_factory, corpora):
    project = build_tiny_project(tmp_path_factory.getbasetemp() / "tiny_project", corpora, "gpt")
    export_bundle(project)
    return project


def _predict(args, cwd, stdin: bytes = b""):
    """Run ``lmpipe predict``; ``args`` may hold bytes (an argument that is not UTF-8) and ``stdin`` is raw bytes."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1"}
    argv = [a if isinstance(a, bytes) else str(a) for a in args]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, "predict", *argv],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=180,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def _lines(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_predict_modules_do_not_import_torch():
    code = (
        "import sys, pipeline_tasks.serve.predict, pipeline_tasks.ship.bundle, pipeline_tasks.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_predict_cli_runs_without_torch_from_bundle_path_only(project, tmp_path):
    from pipeline_tasks.ship.bundle import load_bundle

    texts = [
        "Fed raises interest rates again as inflation persists",
        "Striker scores twice as champions win the cup final",
    ]
    result = _predict([*texts, "--bundle", project.path("bundle_dir")], tmp_path)  # no params.yaml in cwd
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    bundle = load_bundle(project.path("bundle_dir"))
    expected = bundle.predict(texts)  # int8_dynamic, the default variant
    assert [r["text"] for r in rows] == texts
    for row, exp in zip(rows, expected):
        assert row["label"] in bundle.labels and row["label"] == exp["label"]
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert row["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-5)


def test_predict_reads_jsonl_and_plain_lines_with_variant(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_text(
        "\n".join(
            [
                json.dumps({"id": "a1", "text": "Oil prices climb as supply tightens"}),
                json.dumps(
                    {"title": "New smartphone chip unveiled", "description": "The processor doubles battery life."}
                ),
                "",
                "Plain headline: rebels and government sign ceasefire",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir"), "--variant", "fp32"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = _lines(result.stdout)
    assert [r["line"] for r in rows] == [1, 2, 4]
    assert rows[0]["id"] == "a1"
    assert rows[1]["text"] == "New smartphone chip unveiled\nThe processor doubles battery life."
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_predict_uses_bundle_dir_from_params_file(project, tmp_path):
    (tmp_path / "params.yaml").write_text(f"paths:\n  bundle_dir: {project.path('bundle_dir')}\n")
    result = _predict(["Markets slide on trade fears"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(_lines(result.stdout)) == 1


def test_predict_refuses_tampered_bundle(project, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(project.path("bundle_dir"), bundle)
    model = bundle / "model_int8_dynamic.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    result = _predict(["anything", "--bundle", bundle], tmp_path)
    assert result.returncode == 1
    assert "model_int8_dynamic.onnx: sha256" in result.stderr and result.stdout == ""


def test_predict_names_bad_json_line(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    assert result.returncode == 1
    assert f"{news}:2: invalid JSON" in result.stderr


def test_bundle_predict_proba_is_a_distribution(project):
    from pipeline_tasks.ship.bundle import load_bundle

    bundle = load_bundle(project.path("bundle_dir"))
    probs = bundle.predict_proba(["", "a", "Stocks " * 500], "int8_dynamic")  # empty, tiny, truncated
    assert probs.shape == (3, len(bundle.labels))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


# --- inputs a newcomer gives it: blank texts, files that are not UTF-8, JSON lines on stdin (issue 13)


def _assert_refused(result, *expected):
    assert result.returncode == 1, result.stderr
    assert result.stdout == "", "nothing may be classified when an input is refused"
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "... -- !!"])
def test_predict_refuses_a_blank_text_argument(project, tmp_path, blank):
    result = _predict([blank, "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, "text argument 1: no text to classify")


def test_predict_refuses_blank_argument_among_good_ones_naming_it(project, tmp_path):
    result = _predict(["Oil prices climb", "  ", "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, "text argument 2: no text to classify")
    assert "text argument 1" not in result.stderr


def test_predict_refuses_an_argument_that_is_not_utf8(project, tmp_path):
    result = _predict([b"caf\xe9 au lait", "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, "text argument 1: not valid UTF-8", "0xe9")


BLANK_RECORDS = (
    b'{"id": "a1", "text": "Oil prices climb as supply tightens"}\n'
    b'{"id": "a2", "text": "   "}\n'
    b"...\n"
    b"\n"  # a blank line separates, it is not a record
    b'{"title": "", "description": ""}\n'
    b"Rebels and government sign ceasefire\n"
)


def test_predict_file_refuses_batch_naming_every_blank_record(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_bytes(BLANK_RECORDS)
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, f"{news}: 3 of 5 inputs cannot be classified", f"{news}:2:", f"{news}:3:", f"{news}:5:")
    assert f"{news}:1:" not in result.stderr and f"{news}:4:" not in result.stderr


def test_predict_stdin_refuses_batch_naming_every_blank_record(project, tmp_path):
    result = _predict(["--file", "-", "--bundle", project.path("bundle_dir")], tmp_path, stdin=BLANK_RECORDS)
    _assert_refused(result, "<stdin>: 3 of 5 inputs cannot be classified", "<stdin>:2:", "<stdin>:3:", "<stdin>:5:")


def test_predict_refuses_empty_input_file(project, tmp_path):
    news = tmp_path / "news.txt"
    news.write_bytes(b"\n  \n")
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, f"{news}: no text to classify")


LATIN1 = "Caf\u00e9 owners protest new tax\nStocks rally\n".encode("latin-1")


def test_predict_names_file_and_line_of_non_utf8_file(project, tmp_path):
    news = tmp_path / "news.txt"
    news.write_bytes(b"Oil prices climb\n" + LATIN1)
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    _assert_refused(result, f"{news}:2: not valid UTF-8", "0xe9")
    assert f"{news}:3" not in result.stderr  # the ASCII line after it is fine


def test_predict_names_line_of_non_utf8_stdin(project, tmp_path):
    result = _predict(
        ["--file", "-", "--bundle", project.path("bundle_dir")], tmp_path, stdin=b"Oil prices climb\n" + LATIN1
    )
    _assert_refused(result, "<stdin>:2: not valid UTF-8", "0xe9")


def test_predict_stdin_reads_json_lines_like_a_file(project, tmp_path):
    content = (
        json.dumps({"id": "a1", "text": "Oil prices climb as supply tightens"})
        + "\n"
        + json.dumps({"title": "New smartphone chip unveiled", "description": "It doubles battery life."})
        + "\r\n\nPlain headline: rebels and government sign ceasefire\n"
    ).encode()
    news = tmp_path / "news.jsonl"
    news.write_bytes(content)
    bundle = project.path("bundle_dir")
    from_file = _predict(["--file", news, "--bundle", bundle], tmp_path)
    from_stdin = _predict(["--file", "-", "--bundle", bundle], tmp_path, stdin=content)
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr + from_stdin.stderr
    rows = _lines(from_stdin.stdout)
    assert rows == _lines(from_file.stdout)
    assert [r["text"] for r in rows] == [
        "Oil prices climb as supply tightens",
        "New smartphone chip unveiled\nIt doubles battery life.",
        "Plain headline: rebels and government sign ceasefire",
    ]
    assert [r["line"] for r in rows] == [1, 2, 4] and rows[0]["id"] == "a1"


def test_predict_reads_json_lines_after_a_utf8_byte_order_mark(project, tmp_path):
    news = tmp_path / "news.jsonl"
    news.write_bytes(b'\xef\xbb\xbf{"text": "Oil prices climb"}\n')  # what Windows editors save as "UTF-8"
    result = _predict(["--file", news, "--bundle", project.path("bundle_dir")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert [r["text"] for r in _lines(result.stdout)] == ["Oil prices climb"]


def test_predict_help_states_one_input_rule_and_truncation(tmp_path):
    result = _predict(["--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "--file - reads the same format from stdin" in help_text
    assert 'A line that starts with "{" is a JSON object' in help_text
    assert "Long texts are truncated to the model's length" in help_text
