"""The stage list: one name everywhere (module, ``dvc.yaml`` key, Airflow task id, KFP component).

Order is the pipeline order. Commands that are not DVC stages (``predict``, ``promote`` ...) are
listed in :data:`COMMANDS`. Only module names here: importing this file imports nothing heavy.
"""

from __future__ import annotations

# stage name -> module (pipeline_tasks.<family>.<stage>) implementing run(params, **options); the module
# file carries the stage's name, the folder is its family
STAGES: dict[str, str] = {
    "ingest_wiki": "ingest.ingest_wiki",
    "ingest_news": "ingest.ingest_news",
    "prepare": "dataset.prepare",
    "validate": "dataset.validate",
    "tokenize": "dataset.tokenize",
    "pretrain": "train.pretrain",
    "finetune": "train.finetune",
    "compress": "ship.compress",
    "export": "ship.export",
    "evaluate": "ship.evaluate",
    "monitor": "monitor.monitor",
    "register": "registry.register",
}

# Other CLI commands -> module providing add_<command>_arguments(parser) and cli_<command>(args)
COMMANDS: dict[str, str] = {
    "predict": "serve.predict",
    "promote": "registry.promote",
    "rollback": "registry.promote",
    "kfp-compile": "orchestration.kfp",
    "trainjob": "orchestration.trainjob",
    "summary": "summary",
}

# Stages that benefit from an accelerator (Airflow pools / KFP accelerator requests read this).
GPU_STAGES: frozenset[str] = frozenset({"pretrain", "finetune", "compress"})


def stage_command(name: str) -> list[str]:
    """The command of stage ``name``: the ``cmd`` of its ``dvc.yaml`` entry and of every container."""
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return ["python", "-m", "pipeline_tasks", name]
