"""What every stage of a study works from: its spec, its folder, its tracker, its data and its trial tables.

``StudyContext`` is the one thing the stages take (``study.tuning.run_study``, ``study.stages.confirm.confirm_stage``,
``study.stages.report.write_report``, ``study.stages.decide.add_seeds_until_decided``, ``study.records.frames``'s
readers).
None of them imports ``study.study``: ``Study`` (the façade the CLI and the Python API call) is a context that
also runs the stages, so the imports go one way, from the façade down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from study.records.paths import StudyPaths, storage_is_remote
from study.spec import StudySpec

if TYPE_CHECKING:
    from typing import Self

    from study.data.prepare import PreparedData
    from study.records.lock import StudyLock
    from study.tracking import StudyTracker


class StudyNotFound(FileNotFoundError):
    """No ``study.json`` where a study was looked for."""


@dataclass
class StudyContext:
    spec: StudySpec
    spec_path: Path
    paths: StudyPaths
    _data: "PreparedData | None" = field(default=None, repr=False)

    # ----- finding a study -----------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: StudySpec, spec_path: Path) -> "Self":
        return cls(spec, Path(spec_path), StudyPaths.of(spec.storage, spec.name))

    @classmethod
    def open(cls, study: str | Path, storage: str | Path | None = None, *, check_paths: bool = True) -> "Self":
        """A study by name (under ``storage``, default ``./runs``) or by its folder, with the spec, storage and
        MLflow store it ran with. Raises ``StudyNotFound``, ``paths.StudyRecordError`` (a damaged study.json) or
        ``ConfigError`` (its spec no longer validates)."""
        from study.spec import load_spec

        candidates = [Path(study).expanduser(), Path(storage or "runs").expanduser() / str(study)]
        for folder in candidates:
            if (folder / "study.json").is_file():
                paths = StudyPaths.at(folder)
                record = paths.read_record()
                original = Path(record["spec"])
                # The study's own copy when it has one (studies started before it existed read the original).
                source = paths.spec_copy if paths.spec_copy.is_file() else original
                if source != original:
                    _warn_if_edited(original, source)
                spec = load_spec(source, storage=record["storage"], name=record["name"], base=original.parent,
                                 tracking_uri=record["tracking_uri"], check_paths=check_paths)
                if record.get("experiment") and record["experiment"] != spec.name:  # a renamed copy: same store
                    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                        update={"experiment": record["experiment"]})})
                # Studies begun before the precision setting trained in fp32 on the CPU: keep them so.
                return cls.from_spec(spec.with_precision(record.get("precision") or "fp32"), original)
        raise StudyNotFound(f"no study {str(study)!r}: looked for study.json in "
                            f"{', '.join(str(c) for c in candidates)}")

    def named(self, name: str) -> "Self":
        """The same spec as a study called ``name`` (in the same storage)."""
        return type(self).from_spec(self.spec.model_copy(update={"name": name}), self.spec_path)

    def as_new_study(self) -> "Self":
        """This spec as the first of ``NAME-2``, ``NAME-3``, ... that no study uses yet (``study run --new``)."""
        for n in range(2, 10_000):
            candidate = self.named(f"{self.name}-{n}")
            if not candidate.exists() and not candidate.paths.lock.exists():
                return candidate
        raise RuntimeError(f"studies {self.name}-2 ... {self.name}-9999 all exist")

    def exists(self) -> bool:
        """Whether a study of this name was started in this storage: its study.json, or Tune state."""
        from study.records.trial_tables import experiment_states

        return self.paths.study_file.is_file() or bool(experiment_states(self.spec)[1])

    def search_started(self) -> bool:
        """Whether Tune has state for this study (always True for a bucket: nothing cheap to look at)."""
        return storage_is_remote(self.spec.storage) or (self.paths.root / "tune").is_dir()

    # ----- what the stages share -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def spec_text(self) -> str:
        """The spec the study runs with: its own copy (``spec.yaml`` in the folder), else the original file."""
        copy = self.paths.spec_copy
        return (copy if copy.is_file() else self.spec_path).read_text()

    @property
    def tracking_uri(self) -> str:
        return self.paths.tracking_uri(self.spec.tracking.uri)

    @property
    def experiment(self) -> str:
        return self.spec.tracking.experiment or self.spec.name

    def experiment_id(self) -> str | None:
        """The study's MLflow experiment id (for the UI's address), or None when the store cannot say."""
        from study.tracking.mlflow_store import experiment_id

        return experiment_id(self.tracking_uri, self.experiment)

    def tracker(self) -> "StudyTracker":
        from study.tracking import StudyTracker

        return StudyTracker(self.tracking_uri, self.experiment, self.name, self.paths.root)

    def data(self, *, progress: bool = True) -> "PreparedData":
        """The features and tokenised captions every stage reads (prepared once per context)."""
        from study.data.prepare import prepare_for_spec
        from study.records.provenance import check_dataset_unchanged

        if self._data is None:
            data = prepare_for_spec(self.spec, progress=progress)
            check_dataset_unchanged(self.paths, data.info)
            self._data = data
        return self._data

    def tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(trials, history) of the search as the stages read them (``study.records.trial_tables``)."""
        from study.records.trial_tables import load_trial_tables

        return load_trial_tables(self.spec)

    def pin_precision(self) -> str:
        """Resolve ``precision: auto`` once, in this driver, for the device the trials use (CUDA when the spec asks
        for GPUs, else this CPU), so that every trial and confirm run of the study uses the same precision
        whichever node runs it; ``study.json`` keeps it for ``study resume`` and the later stages."""
        from study.trial.precision import resolve

        precision = resolve(self.spec.fixed.get("precision", "auto"), "cuda" if self.spec.resources.gpu else "cpu")
        self.spec = self.spec.with_precision(precision)
        return precision

    def resume_command(self) -> str:
        """The command that continues this study: by name when it lives in ./runs, else by its folder."""
        return self.command("resume")

    def command(self, verb: str) -> str:
        """``study VERB`` of this study, as a hint prints it: by name when it lives in ./runs, else by its folder
        (a bare name outside ./runs failed with "no study"; issue 33, item 20)."""
        root = self.paths.root
        if storage_is_remote(self.spec.storage) or root.parent.resolve() != (Path.cwd() / "runs").resolve():
            return f"study {verb} {root}"
        return f"study {verb} {self.name}"

    def lock(self, command: str) -> "StudyLock":
        """This driver's hold on the study (study/records/lock.py); raises ``StudyInUse`` naming the holder."""
        from study.records.lock import acquire

        return acquire(self.paths.root, command)


def _warn_if_edited(original: Path, copy: Path) -> None:
    """Say so when the YAML a study was started from has changed since: the study keeps using its own copy."""
    try:
        edited = original.read_text() != copy.read_text()
    except OSError:
        edited = False  # moved or deleted: nothing to compare, and nothing the study needs
    if edited:
        logging.getLogger(__name__).warning(
            "%s was edited after this study started; the study keeps the spec it ran with, %s "
            "(a study of the edited spec: study run %s --new)", original, copy, original)
