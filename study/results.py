"""A study's results as pandas DataFrames: the Python API beside the ``study`` command.

    import study

    s = study.load("quickstart")          # a study name under ./runs, a study folder, or name + storage=
    s.trials()        # one row per search trial: parameters, status, epochs, its best epoch's metrics
    s.history()       # one row per trial and epoch: every reported metric (learning curves)
    s.leaderboard()   # the best trial of each injection method, the overall best first
    s.confirm()       # one row per confirm run: method, config rank, seed, test metrics, time, parameters
    s.verdict()       # one row per method: role, seeds, each test metric's mean and interval

Everything is read from the study's own folder (Tune's trial folders and the confirm stage's JSON files), as
``study leaderboard`` and ``study report`` read it: no MLflow server, no Ray, no GPU. Scores are on
pycocoevalcap's 0..1 scale (papers print them x100). Reading is cheap and always current, so a running
study can be watched by calling the methods again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from study.spec import StudySpec

TEST_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")


def load(study: str | Path, storage: str | Path | None = None) -> "Study":
    """Open a study by name (under ``storage``, default ``./runs``) or by its folder."""
    candidates = [Path(study).expanduser(), Path(storage or "runs").expanduser() / str(study)]
    for folder in candidates:
        if (folder / "study.json").is_file():
            return Study(folder.resolve())
    raise FileNotFoundError(f"no study {str(study)!r}: looked for study.json in "
                            f"{', '.join(str(c) for c in candidates)}")


@dataclass
class Study:
    """One study's folder; every method reads it afresh."""

    folder: Path

    @property
    def info(self) -> dict:
        """``study.json``: the study's name, spec file, storage and MLflow store."""
        return json.loads((self.folder / "study.json").read_text())

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def spec(self) -> "StudySpec":
        """The spec the study runs with (its storage as it ran; dataset paths are not checked)."""
        from study.spec import load_spec

        info = self.info
        return load_spec(Path(info["spec"]), check_paths=False, storage=info["storage"], name=info["name"])

    def _tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        from study.tuning import load_trial_tables  # Tune's files read as plain JSON; Ray is not started

        return load_trial_tables(self.spec)

    def trials(self) -> pd.DataFrame:
        """One row per search trial: its parameters (None where a conditional one was not sampled), ``status``
        (completed, stopped by ASHA, errored, running), ``epochs`` trained, ``best_epoch`` and the metrics of
        that epoch (a trial's score is its best epoch by the spec's metric, everywhere)."""
        return _typed(self._tables()[0])

    def history(self) -> pd.DataFrame:
        """One row per trial and epoch with every reported metric (``trial_id``, ``inject``, ``epoch``, ...)."""
        return _typed(self._tables()[1])

    def leaderboard(self, *, metric: str | None = None, best_per_method: bool = True) -> pd.DataFrame:
        """The trials sorted by ``metric`` (default: the spec's), best per method first; what
        ``study leaderboard`` prints (before its x100 display)."""
        from study.leaderboard import leaderboard
        from study.spec import METRIC_MODES

        spec = self.spec
        metric = metric or spec.metric
        mode = spec.mode if metric == spec.metric else METRIC_MODES.get(metric, "max")
        return leaderboard(self.trials(), metric=metric, mode=mode, best_per_method=best_per_method)

    def confirm(self) -> pd.DataFrame:
        """One row per finished confirm run: ``method, config_rank, seed``, the test metrics (beam search, the
        whole test split), ``epochs, train_seconds, seconds, params``, and the trial config's fields."""
        rows = []
        for path in sorted((self.folder / "confirm").glob("*.json")):
            result = json.loads(path.read_text())
            row = {"run": path.stem, "method": result["method"], "config_rank": result["config_rank"],
                   "seed": result["seed"]}
            row.update({m: result["scores"].get(m) for m in TEST_METRICS})
            row.update({k: result.get(k) for k in ("epochs", "train_seconds", "seconds", "params")})
            row.update({k: v for k, v in result["config"].items() if k not in row})
            rows.append(row)
        columns = ["run", "method", "config_rank", "seed", *TEST_METRICS, "epochs", "train_seconds", "seconds",
                   "params"]
        return _typed(pd.DataFrame(rows, columns=None if rows else columns))

    def per_image(self) -> pd.DataFrame:
        """One row per confirm run and test image: ``method, config_rank, seed, image_id`` and its scores."""
        rows = []
        for path in sorted((self.folder / "confirm").glob("*.json")):
            result = json.loads(path.read_text())
            scores = result["per_image"]
            for image_id in sorted({k for d in scores.values() for k in d}, key=int):
                row = {"method": result["method"], "config_rank": result["config_rank"], "seed": result["seed"],
                       "image_id": int(image_id)}
                row.update({m: scores[m].get(image_id) for m in scores})
                rows.append(row)
        return _typed(pd.DataFrame(rows))

    def verdict(self) -> pd.DataFrame:
        """One row per method (index ``method``): its ``role`` in the verdict, ``seeds``, ``images`` and each test
        metric's mean with ``<metric>_lo``/``_hi`` interval bounds, at the level the report uses (95%, or the
        sequential plan's per-look level after ``study decide``). ``attrs["verdict"]`` holds the words,
        ``attrs["diff"]`` and ``attrs["ci"]`` the difference target - best other and its interval."""
        from analysis.verdict import compute_verdict
        from study.confirm import sequential_plan
        from study.registry import method_roles

        spec = self.spec
        plan = sequential_plan(spec, self.folder)
        verdict = compute_verdict(self.per_image(), self.confirm(), roles=method_roles(),
                                  margin=spec.confirm.margin, level=plan.level if plan else 0.95)
        table = verdict.table.copy()
        table.attrs.update(verdict=verdict.verdict, diff=verdict.diff, ci=verdict.ci, best_other=verdict.best_other,
                           margin=verdict.margin, level=verdict.level, text=verdict.text)
        return table


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Numbers as numbers (int where whole, Int64 where some are missing), names as strings."""
    frame = frame.convert_dtypes(convert_string=False, convert_boolean=False)
    for col in frame.columns:
        if frame[col].dtype == object:
            converted = pd.to_numeric(frame[col], errors="coerce")
            if converted.notna().sum() == frame[col].notna().sum() and frame[col].notna().any():
                frame[col] = converted
    return frame
