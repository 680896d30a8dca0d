"""How a study's MLflow experiment opens and reads: the metric names, the columns, the runs shown and the address
the project prints.

MLflow keeps its runs table's columns and which runs the charts draw in the browser (local storage), not on the
server; the only server-side view it reads is a *shared view*: an experiment tag ``mlflow.sharedViewState.<key>``
holding the page's state as JSON, opened by ``?viewStateShareKey=<key>`` (what the UI's "Share" button writes).
``study/tracking/mlflow_store.py`` writes this module's view as that tag, and ``study report`` prints its address, so
the
link opens the training ("machine learning") view with the study's columns and every run drawn. No MLflow import
here: this is data.
"""

from __future__ import annotations

import json

VIEW_KEY = "caption-study"  # the share key: ?viewStateShareKey=caption-study
ARMS_KEY = "caption-study-arms"  # the confirm runs grouped by arm: one bar per arm in the chart view
VIEW_TAG, ARMS_TAG = (f"mlflow.sharedViewState.{key}" for key in (VIEW_KEY, ARMS_KEY))
# MLflow 3 opens an experiment in its GenAI view (an empty Overview) unless told the workflow type.
WORKFLOW = "workflowType=machine_learning"

# Seconds and throughput go under MLflow's system/ prefix: the run page's "Model metrics" tab then holds the scores
# and losses alone, the timings sit in "System metrics". The epoch is every metric's step, not a metric of its own.
TIMINGS = frozenset({"train_seconds", "epoch_seconds", "data_seconds", "val_loss_seconds", "decode_seconds",
                     "metric_seconds", "tokens_per_second", "seconds"})


def mlflow_metric(name: str) -> str | None:
    """The MLflow name of a reported metric: ``system/<name>`` for timings, None for ``epoch`` (the step) and
    ``params`` (the parameter count: a run parameter, not a curve)."""
    if name in ("epoch", "params"):
        return None
    return f"system/{name}" if name in TIMINGS else name


def _column(kind: str, name: str) -> str:
    """A runs-table column as MLflow's UI names it (``metrics.`test_CIDEr-D```)."""
    return f"{kind}.`{name}`"


def view_state(metric: str, arms: bool = False) -> dict:
    """The experiment page's state: the runs grouped by their ``arm`` tag (each arm's search trials and confirm runs
    under one row holding their means: MLflow nests child runs under a folded parent otherwise, the search trials
    out of sight), the study's main columns, every run drawn in the charts (MLflow draws the first 10 by default),
    newest first. ``metric`` is the study's (``val_CIDEr-D``): its search trials carry ``best_<metric>``, the
    confirm runs ``test_<score>`` (the score ``metric`` is of). ``arms``: the confirm runs alone, best first (the
    chart view then draws one bar per arm, the mean over its seeds)."""
    score = metric.split("_", 1)[1] if metric.startswith("val_") else metric
    columns = [_column("tags", "kind"), _column("tags", "arm"), _column("tags", "status"),
               _column("metrics", f"best_{metric}"), _column("metrics", f"test_{score}"),
               _column("params", "seed"), _column("params", "config_rank"), _column("params", "params")]
    state = {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
             "selectedColumns": columns, "runsHiddenMode": "SHOW_ALL", "useGroupedValuesInCharts": True,
             "hideEmptyCharts": True,
             "groupBy": {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": "arm"}]}}
    if arms:
        state.update(searchFilter="tags.kind = 'confirm'", orderByKey=f"metrics.`test_{score}`",
                     chartsSearchFilter="test_")  # the test scores' charts, not the validation curves
    return state


def view_tags(metric: str) -> dict[str, str]:
    """The shared views as experiment tags (name -> JSON)."""
    return {VIEW_TAG: json.dumps(view_state(metric), sort_keys=True),
            ARMS_TAG: json.dumps(view_state(metric, arms=True), sort_keys=True)}


def experiment_address(experiment_id: str | int, host: str = "http://127.0.0.1:5000", arms: bool = False) -> str:
    """The address of the study's experiment in its shared view (the runs table, machine-learning workflow), or
    (``arms``) of its confirm runs grouped by arm in the chart view."""
    view = f"{ARMS_KEY}&compareRunsMode=CHART" if arms else VIEW_KEY
    return f"{host}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}&{WORKFLOW}"


def run_address(experiment_id: str | int, run_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """One run's page, in the training view (its "Model metrics" tab holds the scores and losses)."""
    return f"{host}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


EXPERIMENT_NOTE = (
    "Runs of a caption-study study. The parent run (tag kind=study) holds the verdict: table artifacts "
    "verdict.json and test_scores.json (each arm's test scores, mean and sd over seeds, side by side) and the report. "
    "Its children: search trials (kind=trial, named <arm>-<cell>-<layers>x<width>-<tokens>-<trial id>) and confirm "
    "runs (kind=confirm, named confirm-<arm>-r<rank>-s<seed>; params seed = the seed index, torch_seed = 1000 + "
    "seed). Filter with tags.kind = 'confirm' or tags.arm = 'init'; to compare the arms in one chart, open the chart "
    "view and group by the tag arm. Scores are in points (x100 of the 0..1 scale), as the report prints them.")
