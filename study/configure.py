"""``configure()``: the process-wide settings the ``study`` command makes, in one place and made when called,
never when a module is imported (importing ``study`` changes nothing in the importing process).

The ``study`` console script and ``python -m study`` both enter through ``study.cli.main``, which calls it first;
``run_study`` and ``MlflowStore`` call it too, so a study run from Python gets the same Tune and MLflow settings.
It only sets environment defaults (a value the user set is kept), logger levels and one ``--help`` fix, and it is
idempotent.
"""

from __future__ import annotations

import logging
import os

_configured = False


def configure() -> None:
    """Apply the settings below once per process."""
    global _configured
    if _configured:
        return
    _configured = True
    _help_flags_without_a_type()
    # Tune: one checkpoint per epoch with num_to_keep=None snapshots the experiment often; that is intended here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A trial that diverges before its first epoch (or a resumed one that had diverged) ends without reporting,
    # and Tune's strict check then fails the whole run for want of the metric in its flattened config. The check
    # guards against a misspelt metric, which the spec already refuses (StudySpec: metric must be one a trial
    # reports).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # MLflow: fail fast against a dead server instead of its default minutes of retries; the journal covers us.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    # MLflow's sqlite store logs every SQLAlchemy error with its whole traceback before raising it (a full disk, a
    # store half-made when the disk filled); the tracker catches what is raised and says it once, in one sentence.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _help_flags_without_a_type() -> None:
    """--help: typer 0.29 labels every flag `<bool>`, as if it took a value; a flag takes none, so it shows no
    type."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich
    if getattr(shown, "flags_without_a_type", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.flags_without_a_type = True
    TyperOption.display_type_rich = display_type_rich
