"""Everything that touches Ray Tune (its API has moved three times: keep it in one package).

    search.py     the search space -> Optuna (one searcher per injection method), ASHA, the Optuna export
    trainable.py  the Tune trainable: one trial of the shared training loop, its checkpoints, resume rules
    callbacks.py  Tune -> the study tracker (MLflow), the time budget, run names
    ray_compat.py every workaround of Ray's private behaviour, checked against the pinned version at import
    runner.py     ``run_study``: prepare data once, run or resume the Tuner, return the trial table

``study.study.Study`` is what the CLI and the Python API call; it calls ``run_study`` for its search stage. The
readers of what Tune wrote (``study.records.trial_tables``) live outside this package: they import no Ray.
"""

from study.tuning.ray_compat import ensure_ray, ray_session, shutdown, terminated
from study.tuning.runner import StudyOutcome, describe_budget, run_study

__all__ = ["StudyOutcome", "describe_budget", "ensure_ray", "ray_session", "run_study", "shutdown", "terminated"]
