"""Stage ``monitor`` on real dated news: a far month is flagged, reference resamples are not (FPR).

Real everything: HuffPost v3 / AG News through the real ``ingest_news``, a real exported bundle
(tokenizer, classifier embeddings and predictions, LM bits per byte through ONNX Runtime) and
evidently's tests. The reference is HuffPost 2018 (the first months of the v3 file); 2022-08 is
four years later.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from _registry_project import bundles, raw_news

from pipeline_tasks.config import parse_params
from pipeline_tasks.errors import DataError
from pipeline_tasks.monitor import drift

pytestmark = pytest.mark.slow

FPR_RESAMPLES = 20
FPR_BOUND = 0.1
REFERENCE_2018 = {"source": "huffpost_v3", "start": "2018-05-01", "end": "2019-01-01"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpora):
    base = tmp_path_factory.getbasetemp()
    bundle_dir = bundles(base, corpora, ("a",))["a"]
    raw_dir = raw_news(base / "monitor_data", ("huffpost_v3", "ag_news_test"))
    return {"bundle_dir": bundle_dir, "raw_news_dir": raw_dir}


def _params(inputs, tmp_path, **monitor):
    paths = {
        "bundle_dir": str(inputs["bundle_dir"]),
        "raw_news_dir": str(inputs["raw_news_dir"]),
        "prepared_dir": str(tmp_path / "prepared"),
        "monitor_dir": str(tmp_path / "monitor"),
    }
    return {"seed": 1337, "paths": paths, "monitor": monitor}


def test_monitor_flags_far_month_writes_report_and_exits_zero(inputs, tmp_path, capsys):
    from pipeline_tasks.cli import main

    raw = _params(
        inputs,
        tmp_path,
        reference=REFERENCE_2018,
        batch={"source": "huffpost_v3"},
        window_start="2022-08-01",
        window_end="2022-09-01",
        timeline={"start": "2018-05-01", "end": "2022-10-01", "step_months": 12},
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw), encoding="utf-8")

    root, saved = logging.getLogger(), logging.getLogger().handlers[:]
    try:  # the CLI configures logging with force=True; give pytest its handlers back afterwards
        assert main(["monitor", "--params", str(params_file)]) == 0  # drift is a signal, not a failure
    finally:
        root.handlers[:] = saved
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["drift_detected"] is True

    out = tmp_path / "monitor"
    summary = json.loads((out / "drift_summary.json").read_text())
    assert summary["drift_detected"] is True and summary["fired"]
    assert summary["batch"]["rows"] > 100 and summary["batch"]["window"][0].startswith("2022-08-01")
    for name in drift.SIGNALS:  # every signal: value, threshold from params, verdict
        assert {"value", "threshold", "fired", "why"} <= set(summary["signals"][name])
    assert summary["signals"]["descriptors"]["threshold"] == 0.5
    assert summary["details"]["bpb"]["reference"] > 0 and summary["details"]["bpb"]["current"] > 0
    # the HTML report ran the same evidently tests on the same rows: identical scores
    for name, column in summary["details"]["descriptors"]["columns"].items():
        assert summary["evidently_report"][name] == pytest.approx(column["score"], rel=1e-9, abs=1e-12)
    assert summary["evidently_report"]["pooled"] == pytest.approx(summary["values"]["embedding"], abs=1e-12)
    assert summary["evidently_report"]["prediction"] == pytest.approx(summary["values"]["prediction"])
    html = (out / "drift_report.html").read_text(encoding="utf-8")
    assert "Drift in embeddings" in html and all(f"Value Drift for column {c}" in html for c in drift.DESCRIPTORS)
    rows = (out / "drift_over_time.csv").read_text().splitlines()
    assert rows[0].startswith("window,start,end,rows") and len(rows) == 1 + 1 + 5  # header, main, 5 years
    assert (out / "drift_over_time.png").read_bytes()[:4] == b"\x89PNG"
    stats = json.loads((out / "reference_stats.json").read_text())
    assert stats["rows"] > 1000 and set(stats["descriptors"]) == set(drift.DESCRIPTORS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "monitor" and "drift_summary.json" in manifest["outputs"]


@pytest.fixture(scope="module")
def pool(inputs):
    """HuffPost 2018 texts featurized once (every row through the model), plus the far month and AG News."""
    from pipeline_tasks.monitor.monitor import load_slice
    from pipeline_tasks.monitor.params import SliceParams
    from pipeline_tasks.ship.bundle import load_bundle

    paths = parse_params({"paths": {"raw_news_dir": str(inputs["raw_news_dir"])}}).paths
    bundle = load_bundle(inputs["bundle_dir"])

    def features(spec):
        frame, _ = load_slice(SliceParams(**spec), paths, seed=0)
        labels = [v if isinstance(v, str) else None for v in frame["label"]]
        return drift.featurize(bundle, frame["text"].tolist(), labels, np.arange(len(frame)))

    return {
        "ref": features(REFERENCE_2018),
        "far": features({"source": "huffpost_v3", "start": "2022-08-01", "end": "2022-09-01"}),
        "ag": features({"source": "ag_news_test", "max_rows": 1000}),
    }


def _decide(ref, cur, settings, seed=0):
    """The stage's decision for one window (:func:`pipeline_tasks.monitor.monitor.evaluate_window`)."""
    from pipeline_tasks.monitor.permutation import null_thresholds

    values, _ = drift.compare(ref, cur, settings)
    thresholds, _ = null_thresholds(ref, cur, settings, seed)
    return drift.decide_drift(values, thresholds, settings.min_signals)


def test_monitor_false_positive_rate_on_reference_resamples_is_low(pool):
    settings = parse_params({"monitor": {}}).monitor  # the default thresholds of MonitorParams
    rng = np.random.default_rng(2024)
    n = pool["ref"].rows
    flagged = []
    for _ in range(FPR_RESAMPLES):
        perm = rng.permutation(n)
        # a "month" of 200 rows vs a disjoint reference sample of the default reference size
        cur, ref = perm[:200], perm[200 : 200 + settings.reference_rows]
        flagged.append(_decide(pool["ref"].take(ref), pool["ref"].take(cur), settings).drift_detected)
    fpr = sum(flagged) / len(flagged)
    print(f"\nmonitor false-positive rate over {FPR_RESAMPLES} resamples of HuffPost 2018: {fpr:.2f}")
    assert fpr <= FPR_BOUND


@pytest.mark.parametrize("window_rows", [30, 50])
def test_monitor_small_windows_of_the_reference_raise_few_false_alarms(pool, window_rows):
    # the default min_window_rows is 30: a window that small, drawn from the reference's own
    # distribution, must not page anyone (fixed thresholds flagged ~1 in 3 of them)
    settings = parse_params({"monitor": {}}).monitor
    assert settings.min_window_rows <= window_rows
    rng = np.random.default_rng(11)
    flagged = []
    for seed in range(2 * FPR_RESAMPLES):
        perm = rng.permutation(pool["ref"].rows)
        cur, ref = perm[:window_rows], perm[window_rows : window_rows + settings.reference_rows]
        flagged.append(_decide(pool["ref"].take(ref), pool["ref"].take(cur), settings, seed).drift_detected)
    assert sum(flagged) / len(flagged) <= FPR_BOUND


def test_monitor_flags_far_month_and_other_source_against_2018_reference(pool):
    settings = parse_params({"monitor": {}}).monitor
    ref_idx = np.random.default_rng(0).permutation(pool["ref"].rows)[: settings.reference_rows]
    ref = pool["ref"].take(ref_idx)
    far = _decide(ref, pool["far"], settings)
    assert far.drift_detected and "descriptors" in far.fired
    ag = _decide(ref, pool["ag"], settings)  # AG News (2004 wire stories) vs HuffPost: a different source
    assert ag.drift_detected and len(ag.fired) >= 3 and {"descriptors", "bpb"} <= set(ag.fired)


def test_monitor_reads_a_folder_of_new_files_without_labels(inputs, tmp_path):
    from pipeline_tasks.monitor import monitor

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    import pandas as pd

    frame = pd.read_parquet(inputs["raw_news_dir"] / "huffpost_v3.parquet").head(90)
    with open(inbox / "a.jsonl", "w", encoding="utf-8") as fh:
        for title, text in zip(frame["title"][:40], frame["text"][:40]):
            fh.write(json.dumps({"title": title, "description": text.split("\n", 1)[-1]}) + "\n")
    frame.iloc[40:70][["text"]].to_csv(inbox / "b.csv", index=False)
    (inbox / "c.txt").write_text("\n".join(t.replace("\n", " ") for t in frame["text"][70:90]), encoding="utf-8")
    raw = _params(
        inputs,
        tmp_path,
        reference={"source": "huffpost_v3", "end": "2019-01-01", "max_rows": 300},
        batch={"path": str(inbox)},
        reference_rows=200,
        sample_rows=100,
        html_report=False,
    )
    result = monitor.run(parse_params(raw))
    summary = json.loads((tmp_path / "monitor" / "drift_summary.json").read_text())
    assert result["rows"] == 90 and summary["batch"]["rows"] == 90
    assert summary["values"]["label"] is None and "unavailable" in summary["signals"]["label"]["why"]


def test_monitor_outputs_are_swapped_together_and_other_files_kept(inputs, tmp_path, monkeypatch):
    from pipeline_tasks.monitor import monitor

    out = tmp_path / "monitor"
    out.mkdir()
    (out / "notes.txt").write_text("not monitor's\n", encoding="utf-8")  # monitor_dir may be shared
    (out / "reference_stats.json").write_text('{"stale": true}\n', encoding="utf-8")
    raw = _params(
        inputs,
        tmp_path,
        reference={"source": "huffpost_v3", "end": "2019-01-01", "max_rows": 200},
        batch={"source": "huffpost_v3", "start": "2022-08-01", "max_rows": 100},
        reference_rows=100,
        sample_rows=50,
        html_report=False,
    )
    monitor.run(parse_params(raw))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {*monitor.OUTPUT_NAMES, "notes.txt"} and b"stale" not in first["reference_stats.json"]

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    # a crash after the new summary was written must leave the previous outputs, all of them
    monkeypatch.setattr(monitor, "write_over_time", crash)
    with pytest.raises(OSError, match="disk full"):
        monitor.run(parse_params({**raw, "seed": 7}))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".monitor.")]  # no temporary folder left


def test_monitor_too_small_window_fails_naming_the_file(inputs, tmp_path):
    from pipeline_tasks.monitor import monitor

    raw = _params(
        inputs,
        tmp_path,
        reference=REFERENCE_2018,
        batch={"source": "huffpost_v3"},
        window_start="2030-01-01",
        window_end="2030-02-01",
    )
    with pytest.raises(DataError, match="huffpost_v3.parquet.*0 rows"):
        monitor.run(parse_params(raw))


def _small_run(inputs, tmp_path, batch, **monitor):
    """Params of a quick run: a 2018 HuffPost reference sample, no HTML report."""
    return _params(
        inputs,
        tmp_path,
        reference={"source": "huffpost_v3", "end": "2019-01-01", "max_rows": 300},
        batch=batch,
        reference_rows=200,
        sample_rows=100,
        html_report=False,
        **monitor,
    )


def _huffpost_rows(inputs, rows):
    import pandas as pd

    return pd.read_parquet(inputs["raw_news_dir"] / "huffpost_v3.parquet").head(rows)


def test_monitor_refuses_a_folder_that_is_mostly_not_news(inputs, tmp_path, capsys):
    # a corpus distribution as it is unpacked (Reuters-21578 style): SGML articles the monitor cannot
    # read, a README and lists of places and topics, one line each
    from pipeline_tasks.cli import main

    inbox = tmp_path / "reuters"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"reut2-00{i}.sgm").write_text("<REUTERS><TEXT>Oil rose.</TEXT></REUTERS>\n", encoding="utf-8")
    (inbox / "lewis.dtd").write_text("<!ELEMENT REUTERS (DATE, TEXT)>\n", encoding="utf-8")
    readme = "Reuters-21578 text categorization test collection, distribution 1.0, see the files below.\n"
    (inbox / "README.txt").write_text(readme * 40, encoding="utf-8")
    places = "\n".join(f"place{i}" for i in range(60))
    (inbox / "all-places-strings.lc.txt").write_text(places, encoding="utf-8")
    (inbox / "all-topics-strings.lc.txt").write_text(places.replace("place", "topic"), encoding="utf-8")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(_small_run(inputs, tmp_path, {"path": str(inbox)})), encoding="utf-8")

    root, saved = logging.getLogger(), logging.getLogger().handlers[:]
    try:
        code = main(["monitor", "--params", str(params_file)])
    finally:
        root.handlers[:] = saved
    err = capsys.readouterr().err
    assert code == 1, err
    assert str(inbox) in err and "refusing" in err
    assert "reut2-000.sgm: not a news file type (.sgm)" in err and "a list, not news text" in err
    assert not (tmp_path / "monitor" / "drift_summary.json").exists()


def test_monitor_logs_and_reports_files_read_and_skipped_in_a_folder(inputs, tmp_path, caplog):
    from pipeline_tasks.monitor import monitor

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frame = _huffpost_rows(inputs, 80)
    frame.iloc[:40][["text"]].to_csv(inbox / "a.csv", index=False)
    frame.iloc[40:][["text"]].to_csv(inbox / "b.csv", index=False)
    (inbox / "README.txt").write_text("How this folder was exported.\n", encoding="utf-8")
    (inbox / "feed.xml").write_text("<rss/>\n", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="pipeline_tasks.monitor"):
        monitor.run(parse_params(_small_run(inputs, tmp_path, {"path": str(inbox)})))
    read = json.loads((tmp_path / "monitor" / "drift_summary.json").read_text())["batch"]["read"]
    assert read["files_read"] == 2 and read["files_skipped"] == 2 and read["rows_read"] == 80
    assert {s["file"]: s["reason"] for s in read["skipped"]} == {
        "README.txt": "documentation",
        "feed.xml": "not a news file type (.xml)",
    }
    assert "2 files read, 2 skipped" in caplog.text and "skipped" in caplog.text and "feed.xml" in caplog.text


def test_monitor_counts_rows_without_usable_dates_and_reads_the_configured_date_format(inputs, tmp_path, caplog):
    from pipeline_tasks.monitor import monitor

    frame = _huffpost_rows(inputs, 120)
    dates = ["2022-08-10"] * 50 + [None] * 10 + ["31/02/2022"] * 10 + ["08/03/2022"] * 40 + ["not a date"] * 10
    batch = tmp_path / "batch.jsonl"
    with open(batch, "w", encoding="utf-8") as fh:
        for text, date in zip(frame["text"], dates):
            fh.write(json.dumps({"text": text, **({"date": date} if date else {})}) + "\n")
    window = {"window_start": "2022-08-01", "window_end": "2022-09-01"}

    with caplog.at_level(logging.WARNING, logger="pipeline_tasks.monitor"):
        monitor.run(parse_params(_small_run(inputs, tmp_path, {"path": str(batch)}, **window)))
    summary = json.loads((tmp_path / "monitor" / "drift_summary.json").read_text())
    read = summary["batch"]["read"]
    assert read["dates"]["missing"] == 10 and read["dates"]["unparseable"] == 20
    assert read["dates"]["ambiguous"] == 40 and read["undated_rows"] == 30
    assert summary["batch"]["rows"] == 90  # 08/03/2022 read month first: 3 August
    assert "batch: 30 of 120 rows have no usable date" in caplog.text and "'31/02/2022'" in caplog.text
    assert "40 dates such as '08/03/2022'" in caplog.text and "monitor.batch.date_format" in caplog.text

    day_first = {"path": str(batch), "date_format": "%d/%m/%Y"}
    monitor.run(parse_params(_small_run(inputs, tmp_path, day_first, **window)))
    summary = json.loads((tmp_path / "monitor" / "drift_summary.json").read_text())
    assert summary["batch"]["rows"] == 50  # now 8 March, outside the window; ISO dates still read
    assert summary["batch"]["read"]["dates"]["ambiguous"] == 0


def test_monitor_reads_the_canonical_ingest_fields_title_and_body(inputs, tmp_path):
    import pandas as pd

    from pipeline_tasks.monitor import monitor

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    body = "The central bank raised rates by half a point on Tuesday, its third rise this year."
    records = [{"title": f"Rates rise {i}", "body": body, "date": "2022-08-02"} for i in range(40)]
    with open(inbox / "a.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    pd.DataFrame(records).to_csv(inbox / "b.csv", index=False)
    pd.DataFrame(records).to_parquet(inbox / "c.parquet")  # ingest's raw fields, no `text` column
    monitor.run(parse_params(_small_run(inputs, tmp_path, {"path": str(inbox)})))
    summary = json.loads((tmp_path / "monitor" / "drift_summary.json").read_text())
    assert summary["batch"]["rows"] == 120
    chars = summary["batch"]["descriptors"]["chars"]
    expected = np.mean([len(f"{r['title']}\n{body}") for r in records])
    assert chars["mean"] == pytest.approx(expected)  # title, newline, body: as ingest builds `text`
