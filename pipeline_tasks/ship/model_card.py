"""Model card for the evaluated bundle: one document model rendered as Markdown and as HTML.

:func:`build_card` turns the evaluation context (metrics, gate decision, bundle config, data
statistics, params) into a list of blocks — ``("h1"|"h2"|"p", text)``, ``("ul", [items])``,
``("table", headers, rows)`` — and :func:`render_markdown` / :func:`render_html` print the same
blocks, so the two files never disagree. Pure functions, standard library only; every value is
escaped in HTML.

Sections follow Mitchell et al., "Model Cards for Model Reporting" (2019): model details,
intended use, data (sources with dates, licences and counts), training configuration,
metrics with confidence intervals (overall, per class, per slice), quantization and latency,
gate verdicts, limitations.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from typing import Any

Block = tuple


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3g}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


def _ci(metrics: Mapping[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    value = metrics.get(key)
    if value is None:
        return "–"
    return f"{_fmt(value)} [{_fmt(low)}, {_fmt(high)}]" if low is not None else _fmt(value)


DEFAULT_LICENCES = {"wiki": "CC BY-SA (Wikipedia)", "news": "publisher copyright; research / non-commercial use"}


def _source_rows(
    sources: Sequence[Mapping[str, Any]], raw_stats: Mapping[str, Any], prepared: Mapping[str, Any]
) -> list[list[str]]:
    """One row per configured source: where it came from, licence, rows ingested / kept after prepare, dates."""
    rows = []
    for src in sources:
        name = src.get("name", "?")
        stats = (raw_stats.get("sources") or {}).get(name, {})
        after = (prepared.get("sources") or {}).get(name, {})
        lo, hi = (str(stats.get(k) or "")[:10] for k in ("date_min", "date_max"))
        where = src.get("url") or src.get("mirror_path") or src.get("path") or "–"
        licence = src.get("license") or src.get("licence") or DEFAULT_LICENCES.get(src.get("kind", ""), "see source")
        rows.append(
            [
                name,
                src.get("kind", "–"),
                str(where),
                licence,
                _fmt(stats.get("kept", stats.get("pages_kept"))),
                _fmt(after.get("out")),
                f"{lo} … {hi}" if lo or hi else "–",
            ]
        )
    return rows


def _model_blocks(ctx: Mapping[str, Any]) -> list[Block]:
    """Title, verdict, model details and intended use."""
    m, decision, config = ctx["metrics"], ctx["decision"], ctx["bundle_config"]
    model_cfg, cls_cfg = config["model_config"], config["classifier"]
    return [
        ("h1", f"Model card: {ctx.get('project', 'lm-pipeline')} news topic classifier"),
        (
            "p",
            f"Generated {ctx['created_utc']} by `lmpipe evaluate` from bundle `{ctx['bundle_dir']}` "
            f"(git {ctx.get('git_sha') or 'unknown'}). Gate verdict: **{decision['summary']}**.",
        ),
        ("h2", "Model details"),
        (
            "table",
            ["field", "value"],
            [
                [
                    "architecture",
                    f"{model_cfg['arch']} ({model_cfg['n_layer']} layers, width {model_cfg['n_embd']}"
                    + (f", {model_cfg['n_head']} heads" if model_cfg["arch"] == "gpt" else "")
                    + ")",
                ],
                ["context / classifier max_len", f"{model_cfg['block_size']} / {config['max_len']} tokens"],
                ["vocabulary", f"{model_cfg['vocab_size']} byte-level BPE tokens"],
                ["pooling", cls_cfg.get("pooling", "–")],
                ["labels", ", ".join(config["labels"])],
                ["initialisation", "from scratch" if config.get("from_scratch") else "pretrained language model"],
                [
                    "serving variant",
                    f"{m['serving_variant']} (ONNX opset {config.get('opset')}, {config.get('exporter')} exporter)",
                ],
                [
                    "files",
                    ", ".join(f"{v}: {_fmt(info['bytes'] / 1e6, 3)} MB" for v, info in config["variants"].items()),
                ],
            ],
        ),
        ("h2", "Intended use"),
        (
            "p",
            "Topic classification of English news headlines and short descriptions into "
            f"{', '.join(config['labels'])}. Inputs longer than {config['max_len']} tokens are truncated "
            "(the beginning is kept). Use `lmpipe predict` or `pipeline_tasks.ship.bundle.load_bundle`; "
            "the bundle needs only onnxruntime, numpy and tokenizers.",
        ),
        (
            "p",
            "Out of scope: other languages, long documents, content moderation or any decision about "
            "people; the model has not been evaluated for those uses.",
        ),
    ]


def _data_blocks(ctx: Mapping[str, Any]) -> list[Block]:
    """Sources with licences and counts, split sizes, and the training configuration."""
    blocks: list[Block] = [("h2", "Data")]
    sources = ctx.get("sources") or []
    if sources:
        blocks.append(
            (
                "table",
                ["source", "kind", "location", "licence", "ingested", "after prepare", "dates"],
                _source_rows(sources, ctx.get("raw_stats") or {}, ctx.get("prepared_stats") or {}),
            )
        )
    splits = ctx.get("split_counts") or {}
    if splits:
        blocks.append(
            (
                "p",
                "Prepared split sizes: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in splits.items())
                + f". Test rows scored here: {ctx['metrics']['n_test']}.",
            )
        )
    blocks.append(
        (
            "p",
            "Licences: Wikipedia text is CC BY-SA; AG News, BBC and HuffPost texts belong to their "
            "publishers and are used for research and testing only (see the data mirror README).",
        )
    )
    training = ctx.get("training") or {}
    if training:
        blocks += [
            ("h2", "Training configuration"),
            (
                "table",
                ["section", "settings"],
                [
                    [k, ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in v.items() if not isinstance(vv, (dict, list)))]
                    for k, v in training.items()
                    if isinstance(v, Mapping)
                ],
            ),
        ]
    return blocks


def _metric_blocks(ctx: Mapping[str, Any]) -> list[Block]:
    """Every variant's scores and timings, per class and per slice numbers of the serving variant."""
    m = ctx["metrics"]
    variant = m["serving_variant"]
    blocks: list[Block] = [
        ("h2", "Metrics (test split)"),
        (
            "p",
            f"{int(100 * ctx['confidence'])}% percentile-bootstrap intervals ({ctx['bootstrap_resamples']} "
            "resamples, seeded).",
        ),
        (
            "table",
            ["variant", "accuracy [CI]", "macro-F1 [CI]", "p50 ms (b=1)", "p95 ms (b=1)", "rows/s (b=32)", "size MB"],
            [
                [
                    v,
                    _ci(vm, "accuracy"),
                    _ci(vm, "macro_f1"),
                    _fmt(vm.get("latency_p50_ms")),
                    _fmt(vm.get("latency_p95_ms")),
                    _fmt(vm.get("throughput_rows_per_s")),
                    _fmt(vm.get("size_mb"), 3),
                ]
                for v, vm in m["variants"].items()
            ],
        ),
        (
            "p",
            f"int8 accuracy drop vs fp32: {_fmt(m.get('int8_accuracy_drop'))}. "
            f"LM validation bits per byte (exported LM): {_fmt(m.get('lm_val_bpb'))}.",
        ),
        ("h2", f"Per class ({variant})"),
        (
            "table",
            ["class", "precision", "recall", "F1", "support"],
            [
                [c, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), _fmt(v["support"])]
                for c, v in m["per_class"].items()
            ],
        ),
    ]
    blocks += _baseline_blocks(m, variant)
    blocks += _student_blocks(m, variant)
    for kind, slices in (m.get("slices") or {}).items():
        blocks += [
            ("h2", f"Slices by {kind} ({variant})"),
            (
                "table",
                ["slice", "n", "accuracy [CI]", "macro-F1"],
                [[name, _fmt(s["n"]), _ci(s, "accuracy"), _fmt(s.get("macro_f1"))] for name, s in slices.items()],
            ),
        ]
    return blocks


def _baseline_blocks(m: Mapping[str, Any], variant: str) -> list[Block]:
    """Model vs the n-gram baseline on the same test rows (nothing when no baseline was trained)."""
    b = m.get("baseline")
    if not b:
        return []
    selected = b.get("selected", {})
    return [
        ("h2", "Against the n-gram baseline"),
        (
            "p",
            f"TF-IDF word 1–2-grams + logistic regression, trained on the same {_fmt(b.get('n_train'))} rows as "
            f"the model, C = {_fmt(selected.get('C'))} chosen on {_fmt(b.get('n_val'))} val rows "
            f"(val macro-F1 {_fmt(selected.get('val_macro_f1'))}); scored on the same test rows. Gains are "
            "served minus baseline with a paired bootstrap interval.",
        ),
        (
            "table",
            ["model", "accuracy [CI]", "macro-F1 [CI]", "train s"],
            [
                [variant, _ci(m, "accuracy"), _ci(m, "macro_f1"), "(pipeline)"],
                ["n-gram baseline", _ci(b, "accuracy"), _ci(b, "macro_f1"), _fmt(b.get("train_seconds"), 1)],
                ["gain", _ci(m, "gain_over_baseline"), _ci(b, "gain_macro_f1"), ""],
            ],
        ),
    ]


def _student_blocks(m: Mapping[str, Any], variant: str) -> list[Block]:
    """The served student beside its teacher (nothing when the served model is not a student of compress)."""
    st = m.get("student")
    if not m.get("compressed") or not st:
        return []
    return [
        ("h2", "Student and its teacher"),
        (
            "p",
            f"The served model is a {st.get('method')} student of the fine-tuned teacher "
            f"({_fmt(st.get('teacher_params'))} parameters -> {_fmt(st.get('student_params'))}). Both are scored "
            f"on the same {_fmt(m.get('n_test'))} test rows and timed side by side, batch 1 on CPU, rounds "
            "interleaved; the teacher runs as int8 dynamic ONNX. The student gates read the drop and the speed-up.",
        ),
        (
            "table",
            ["model", "accuracy", "macro-F1", "p50 ms", "p95 ms", "size MB", "parameters"],
            [
                [
                    "teacher",
                    _fmt(st.get("teacher_accuracy")),
                    _fmt(st.get("teacher_macro_f1")),
                    _fmt(st.get("teacher_latency_p50_ms"), 3),
                    _fmt(st.get("teacher_latency_p95_ms"), 3),
                    _fmt(st.get("teacher_size_mb"), 2),
                    _fmt(st.get("teacher_params")),
                ],
                [
                    f"student ({variant})",
                    _fmt(m.get("accuracy")),
                    _fmt(m.get("macro_f1")),
                    _fmt(st.get("student_latency_p50_ms"), 3),
                    _fmt(st.get("student_latency_p95_ms"), 3),
                    _fmt(m.get("size_mb"), 2),
                    _fmt(st.get("student_params")),
                ],
                [
                    "student vs teacher",
                    f"drop {_fmt(m.get('student_accuracy_drop'))}",
                    "",
                    f"{_fmt(m.get('student_speedup'), 2)}x faster",
                    "",
                    "",
                    f"agreement {_fmt(st.get('agreement'))}",
                ],
            ],
        ),
    ]


def _gate_blocks(ctx: Mapping[str, Any]) -> list[Block]:
    """Every gate with its reason, then the limitations."""
    return [
        ("h2", "Gates"),
        (
            "table",
            ["gate", "value", "threshold", "passed", "why"],
            [
                [
                    name,
                    _fmt(g["value"]),
                    _fmt(g["threshold"]),
                    "skipped" if g.get("skipped") else _fmt(g["passed"]),
                    g["why"],
                ]
                for name, g in ctx["decision"]["gates"].items()
            ],
        ),
        ("h2", "Limitations"),
        (
            "ul",
            [
                "Trained on a small, English, mostly 2004 (AG News) and 2018-2022 (HuffPost) news sample: topics, "
                "entities and vocabulary drift over time; watch the `monitor` drift report.",
                "Slices with few rows have wide intervals; a slice below the minimum size is not reported.",
                "Latency was measured on this machine's CPU with the intra-op thread count in params; it is not "
                "a service-level guarantee.",
                "The champion comparison uses the production model's recorded metrics, which may come from an "
                "older test split.",
                *ctx.get("extra_limitations", []),
            ],
        ),
    ]


def build_card(ctx: Mapping[str, Any]) -> list[Block]:
    """Blocks of the card from the evaluate stage's context (see :func:`pipeline_tasks.ship.evaluate.card_context`)."""
    return _model_blocks(ctx) + _data_blocks(ctx) + _metric_blocks(ctx) + _gate_blocks(ctx)


def render_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            headers, rows = block[1], block[2]

            def cell(x):
                return str(x).replace("|", "\\|").replace("\n", " ")

            lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render the two inline Markdown forms the card uses (**bold**, `code`)."""
    text = html.escape(str(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render_html(blocks: Sequence[Block], title: str = "Model card") -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "th{background:#f3f3f3}code{background:#f6f6f6;padding:0 3px}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
