"""The test-split ledger: every time a study's verdict is computed on a test split, one row beside the studies.

    <storage>/ledger.csv   one row per study, spec, protocol and test set (``StudyPaths.ledger``), append-only

Each look at a test split under a new protocol is a fork in the path: the report lists the earlier studies that
scored the same split (``forks``), so a reader knows how many looks an answer had. A row is written when the
report first computes the verdict on a set; the same study, spec, protocol and set with the same difference is
not written again (rerunning ``study report`` adds nothing), and a changed difference (``study decide`` added
seeds) adds a new row that says so. Rows are appended whole, one ``write`` under an exclusive lock on an
``O_APPEND`` file, so two drivers never interleave a line.

Columns (``COLUMNS``): ``study, spec_sha256, arms, protocol, date, set, split_fingerprint, target, comparator,
comparator_rule, diff, lo, hi, level, seeds, images, verdict, source, note`` (differences on the 0..1 scale).
"""

from __future__ import annotations

import csv
import datetime
import fcntl
import hashlib
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from study.records import missing

if TYPE_CHECKING:
    from study.spec import StudySpec

COLUMNS = ["study", "spec_sha256", "arms", "protocol", "date", "set", "split_fingerprint", "target", "comparator",
           "comparator_rule", "diff", "lo", "hi", "level", "seeds", "images", "verdict", "source", "note"]
IDENTITY = ["study", "spec_sha256", "protocol", "set"]  # one row per these, unless the difference changes


def spec_sha256(text: str) -> str:
    """The sha256 of the study's own spec copy (``spec.yaml``), as text."""
    return hashlib.sha256(text.encode()).hexdigest()


def protocol_summary(spec: "StudySpec") -> str:
    """The protocol in one line: the search's trials and epochs, and every confirm setting (so a selection rule
    the confirm stage records, and the planned seeds, are part of it)."""
    search = spec.search
    confirm = ", ".join(f"{k} {v}" for k, v in spec.confirm.model_dump().items() if v is not None)
    return (f"search: {search.trials} trials ({search.algorithm}{', per ' + spec.stratify if spec.stratify else ''}), "
            f"up to {spec.asha.max_epochs} epochs; confirm: {confirm}")


def ledger_row(spec: "StudySpec", spec_text: str, verdict, set_name: str, fingerprint: str,
               comparator_rule: str, source: str = "study report") -> dict:
    """The ledger row of one verdict (``analysis.verdict.Verdict``) on one test set."""
    seeds = "" if verdict.best_other is None else int(min(verdict.table.loc[verdict.target, "seeds"],
                                                          verdict.table.loc[verdict.best_other, "seeds"]))
    images = int(verdict.table["images"].max()) if len(verdict.table) else ""
    return {"study": spec.name, "spec_sha256": spec_sha256(spec_text), "arms": " ".join(map(str, verdict.table.index)),
            "protocol": protocol_summary(spec),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "set": set_name, "split_fingerprint": fingerprint, "target": verdict.target,
            "comparator": verdict.best_other or "", "comparator_rule": comparator_rule, "diff": verdict.diff,
            "lo": verdict.ci[0], "hi": verdict.ci[1], "level": verdict.level, "seeds": seeds, "images": images,
            "verdict": verdict.verdict, "source": source, "note": ""}


def read_ledger(path: Path) -> pd.DataFrame:
    """The ledger's rows (every column as text, numbers parsed where they are numbers); empty when absent."""
    if not Path(path).is_file() or Path(path).stat().st_size == 0:
        return pd.DataFrame(columns=COLUMNS)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in ("diff", "lo", "hi", "level"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")  # "" (no interval): NaN
    return frame


def _same_numbers(row: pd.Series, new: dict) -> bool:
    def close(a, b) -> bool:
        a, b = float(a), float(b) if b != "" else math.nan
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return all(close(row[k], new[k]) for k in ("diff", "lo", "hi", "level")) and str(row["seeds"]) == str(new["seeds"])


def record(path: Path, row: dict) -> bool:
    """Append ``row`` unless the latest row of the same study, spec, protocol and set already holds its numbers;
    a changed difference is appended with a note saying what changed. Returns whether a row was written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # read and append as one step: two reports of one study write one row
        frame = read_ledger(path)
        same = frame[(frame[IDENTITY] == pd.Series({k: str(row[k]) for k in IDENTITY})).all(axis=1)] if len(frame) \
            else frame
        if len(same):
            last = same.iloc[-1]
            if _same_numbers(last, row):
                return False
            more = (str(row["seeds"]).isdigit() and str(last["seeds"]).isdigit()
                    and int(row["seeds"]) > int(last["seeds"]))
            row = {**row, "note": (f"more seeds ({last['seeds']} -> {row['seeds']}, study decide): the difference "
                                   "changed" if more else "the difference changed under the same protocol")}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        if os.fstat(fd).st_size == 0:
            writer.writeheader()
        writer.writerow({k: "" if missing(row.get(k)) else row[k] for k in COLUMNS})
        os.write(fd, buffer.getvalue().encode())
        return True
    finally:
        os.close(fd)  # releases the lock


def same_split(frame: pd.DataFrame, set_name: str, fingerprint: str) -> pd.Series:
    """Rows that scored the same test split: the same fingerprint where both rows know it, else the same name."""
    if frame.empty:
        return pd.Series(dtype=bool)
    known = (frame["split_fingerprint"] != "") & (fingerprint != "")
    return (known & (frame["split_fingerprint"] == fingerprint)) | (~known & (frame["set"] == set_name))


def forks(frame: pd.DataFrame, study: str, spec_hash: str, protocol: str, set_name: str,
          fingerprint: str) -> pd.DataFrame:
    """The earlier looks at the same test split by other studies or protocols (one row per study, spec and
    protocol: its latest), in the order they were written."""
    if frame.empty:
        return frame
    rows = frame[same_split(frame, set_name, fingerprint)]
    rows = rows[~((rows["study"] == study) & (rows["spec_sha256"] == spec_hash) & (rows["protocol"] == protocol))]
    return rows.drop_duplicates(["study", "spec_sha256", "protocol", "set"], keep="last")


def comparator_rule(record: dict | None) -> str:
    """How the verdict's comparator was chosen, for the ledger (``study.records.comparing.read_comparator_record``)."""
    if record is None:
        return "best competitor on the test means (none fixed before the test split was scored)"
    return f"fixed before the test split was scored: {record.get('chosen_by') or 'no reason recorded'}"


def earlier_looks(path: Path, spec: "StudySpec", spec_text: str,
                  fingerprints: dict[str, str]) -> dict[str, pd.DataFrame]:
    """For each set (``{name: split fingerprint}``), the ledger's earlier looks at it by other studies or
    protocols (``forks``)."""
    frame = read_ledger(path)
    digest, protocol = spec_sha256(spec_text), protocol_summary(spec)
    return {name: forks(frame, spec.name, digest, protocol, name, fp) for name, fp in fingerprints.items()}


def record_looks(path: Path, spec: "StudySpec", spec_text: str, verdicts: dict, fingerprints: dict[str, str],
                 rule: str) -> int:
    """Append one row per set whose verdict compared something (``record``); returns how many were written."""
    written = 0
    for name, verdict in verdicts.items():
        if verdict.best_other is not None:
            written += record(path, ledger_row(spec, spec_text, verdict, name, fingerprints.get(name, ""), rule))
    return written


def export_rows(path: Path, fingerprints: dict[str, str]) -> pd.DataFrame:
    """The ledger's rows for the test splits an export's study scored (every study's looks at them)."""
    frame = read_ledger(path)
    if frame.empty:
        return frame
    mask = pd.Series(False, index=frame.index)
    for name, fp in fingerprints.items():
        mask |= same_split(frame, name, fp)
    return frame[mask]
