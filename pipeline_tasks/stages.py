"""The stage list: one name everywhere (module, ``dvc.yaml`` key, Airflow task id, KFP component).

Order is the pipeline order. Commands that are not DVC stages (``predict``, ``promote`` ...) are
listed in :data:`COMMANDS`. Only module names here: importing this file imports nothing heavy.
"""

from __future__ import annotations

# stage name -> module (pipeline_tasks.<module>) implementing run(params, **options)
STAGES: dict[str, str] = {
    "ingest_wiki": "ingest_wiki",
    "ingest_news": "ingest_news",
    "prepare": "prepare",
    "validate": "validate",
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "finetune": "finetune",
    "export": "export",
    "evaluate": "evaluate",
    "monitor": "monitor",
    "register": "register",
}

# Other CLI commands -> "module:function" taking parsed argparse namespace
COMMANDS: dict[str, str] = {
    "predict": "predict",
    "promote": "promote",
    "rollback": "promote",
    "kfp-compile": "kfp_pipeline",
    "summary": "summary",
}

# Stages that benefit from an accelerator (Airflow pools / KFP accelerator requests read this).
GPU_STAGES: frozenset[str] = frozenset({"pretrain", "finetune"})
