"""Section ``register`` of params.yaml (:class:`RegisterParams`), read by ``register``, ``promote`` and ``rollback``.

Stdlib only, so that :func:`pipeline_tasks.config.load_params` can check this section without
importing mlflow.
"""

from __future__ import annotations

import dataclasses
import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    """Section ``register`` of params.yaml."""

    model_name: str = "lm-pipeline-news-classifier"  # registered model name
    experiment: str = "lm-pipeline"  # MLflow experiment of the runs
    challenger_alias: str = "challenger"
    production_alias: str = "production"
    history_tag_entries: int = 20  # promotion history entries mirrored in a registered-model tag
    lock_timeout_s: float = 60.0  # promote / rollback wait this long for the registry lock

    def __post_init__(self):
        for key in ("model_name", "experiment", "challenger_alias", "production_alias"):
            if not _NAME.fullmatch(getattr(self, key)):
                raise ValueError(f"{key} must match {_NAME.pattern}, got {getattr(self, key)!r}")
        if self.challenger_alias == self.production_alias:
            raise ValueError("challenger_alias and production_alias must differ")
        if self.history_tag_entries < 1 or self.lock_timeout_s <= 0:
            raise ValueError("history_tag_entries must be >= 1 and lock_timeout_s > 0")
