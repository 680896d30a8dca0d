"""Write ``results/ledger.csv``: the test-split ledger (``study.records.ledger``) of the studies committed under
results/,
read from the repository's git history, so a study's report can say how often Flickr8k's test split was looked at.

    python benchmarks/seed_ledger.py            # rewrite results/ledger.csv
    python benchmarks/seed_ledger.py --check    # exit 1 if the committed file differs from what this writes

Rows, oldest first: every committed version of ``results/flickr8k/`` and ``results/flickr8k_tokens/``. An export
that holds its own ``ledger.csv`` (every export since issue 31) gives its study's rows as the platform wrote them;
an older one is read from its ``report.md`` (the printed interval and word), ``verdict.csv`` /
``evaluation_verdicts.csv`` (the exact difference of the means), ``spec.yaml`` (the spec hash and protocol) and
``provenance.json`` (the split's fingerprint). Each row is marked with the commit it was read from; the current
``results/flickr8k`` is the newest of them; and the precision benchmark the README reported (init and attention at
5 epochs, no interval). A version that
restores an earlier one (the same spec and numbers) is not a new look and adds no row. Intervals are the
report's, printed x100 with one decimal. Without git history (a shallow clone) nothing is written.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from study.records.ledger import COLUMNS, record, spec_sha256  # noqa: E402

EXPORTS = ("results/flickr8k", "results/flickr8k_tokens")
BENCHMARK = "benchmarks/precision_quality.py"  # the README's precision table names it
OUT = REPO / "results" / "ledger.csv"


def git(*args: str, repo: Path = REPO) -> str | None:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def history_available(repo: Path = REPO) -> bool:
    """Whether the commits these rows come from are in this clone (not in a shallow one)."""
    return git("cat-file", "-e", "2d70332^{commit}", repo=repo) is not None


def _protocol(spec: dict) -> str:
    search, asha, confirm = spec.get("search", {}), spec.get("asha", {}), spec.get("confirm", {})
    settings = ", ".join(f"{k} {v}" for k, v in confirm.items() if v is not None)
    per = f", per {spec['stratify']}" if spec.get("stratify") else ""
    return (f"search: {search.get('trials', '?')} trials ({search.get('algorithm', 'optuna')}{per}), up to "
            f"{asha.get('max_epochs', '?')} epochs; confirm: {settings}")


def _interval(text: str, pattern: str) -> tuple[str, float, float, float] | None:
    """(comparator, diff, lo, hi) on the 0..1 scale from a report sentence."""
    found = re.search(pattern, text)
    if found is None:
        return None
    other, diff, lo, hi = found.groups()
    return other, float(diff) / 100, float(lo) / 100, float(hi) / 100


def _current(commit: str, folder: str) -> str:
    """", the current export" when the working tree's export is this commit's."""
    here = REPO / folder / "report.md"
    return ", the current export" if here.is_file() and git("show", f"{commit}:{folder}/report.md") == \
        here.read_text() else ""


def _looks(commit: str, folder: str, date: str) -> list[dict]:
    """The rows of one committed version of an export folder: its test split, and each other set it scored."""
    show = lambda name: git("show", f"{commit}:{folder}/{name}")  # noqa: E731
    exported = show("ledger.csv")
    if exported is not None:  # an export since issue 31 carries its study's own rows, exact: take them as written
        study = json.loads(show("export.json") or "{}").get("study")
        rows = pd.read_csv(io.StringIO(exported), dtype=str, keep_default_na=False).query("study == @study")
        where = f"git history {commit[:7]} ({folder}{_current(commit, folder)})"
        return [{**row, "source": f"{row['source']}; {where}"} for row in rows.to_dict("records")]
    report, spec_text, verdict = show("report.md"), show("spec.yaml"), show("verdict.csv")
    if report is None or spec_text is None or verdict is None:
        return []
    spec = yaml.safe_load(spec_text)
    origin = json.loads(show("provenance.json") or "{}")
    study = json.loads(show("export.json") or "{}").get("study") or spec["name"]
    dataset = spec.get("dataset", {})  # named as study.records.comparing.test_set_name names it
    base = Path(dataset.get("json") or dataset.get("json_path") or "shapes").stem.removeprefix("dataset_")
    common = {"study": study, "spec_sha256": spec_sha256(spec_text), "protocol": _protocol(spec), "date": date,
              "comparator_rule": "best competitor on the test means (none fixed before the test split was scored)",
              "source": f"git history {commit[:7]} ({folder}{_current(commit, folder)})",
              "note": "read from git history; interval as the report printed it (x100, one decimal)"}
    sets = [(f"{base} test (the study's)", str(origin.get("dataset fingerprint", "")), pd.read_csv(io.StringIO(
        verdict)), _interval(report, r"Difference init - (\w+) \(CIDEr-D\): (-?[\d.]+) \[(-?[\d.]+), (-?[\d.]+)\]"),
        re.search(r"^\*\*init ([a-z ]+?)[*:]", report, re.M))]
    others = show("evaluation_verdicts.csv")
    for name in (pd.read_csv(io.StringIO(others))["dataset"].unique() if others else []):
        section = report[report.index(f"**Verdict on {name}:"):]
        sets.append((name, "", pd.read_csv(io.StringIO(others)).query("dataset == @name"), _interval(
            section, r"the difference init - (\w+) is (-?[\d.]+) with a 95% paired-bootstrap interval "
                     r"\[(-?[\d.]+), (-?[\d.]+)\]"), re.search(rf"\*\*Verdict on {name}: init ([a-z ]+?)[*:]", report)))
    rows = []
    for name, fingerprint, table, found, word in sets:
        other, _, lo, hi = found
        means = table.set_index("method")
        rows.append({**common, "arms": " ".join(means.index), "set": name, "split_fingerprint": fingerprint,
                     "target": "init", "comparator": other,
                     "diff": float(means.loc["init", "CIDEr-D"] - means.loc[other, "CIDEr-D"]), "lo": lo, "hi": hi,
                     "level": float(means.loc["init"].get("level", 0.95)) if "level" in means else 0.95,
                     "seeds": int(min(means.loc["init", "seeds"], means.loc[other, "seeds"])),
                     "images": int(means.loc["init", "images"]), "verdict": word.group(1) if word else ""})
    return rows


def _benchmark_look() -> list[dict]:
    """The README's precision benchmark: init and attention at 5 epochs, each seed in fp32 and bf16 (no interval)."""
    commits = (git("log", "-S", BENCHMARK, "--format=%H %cI", "--", "README.md") or "").split("\n")
    commit, date = [c for c in commits if c][-1].split()  # the commit that added the table
    readme = git("show", f"{commit}:README.md") or ""
    scores = {m: [float(v) for v in re.findall(rf"^\| {m} \| 100\d \| (?:bf16|fp32) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|",
                                                readme, re.M)] for m in ("init", "attention")}
    diff = (sum(scores["init"]) / len(scores["init"]) - sum(scores["attention"]) / len(scores["attention"])) / 100
    return [{"study": "precision benchmark (benchmarks/precision_quality.py)", "spec_sha256": "",
             "arms": "init attention",
             "protocol": "no search: the committed study's init and attention configurations, GRU 1 x 512, 5 epochs, "
                         "seeds 1000-1002 each in fp32 and bf16, beam 3",
             "date": date, "set": "flickr8k test (the study's)", "split_fingerprint": "", "target": "init",
             "comparator": "attention", "comparator_rule": "the benchmark's choice", "diff": diff, "lo": float("nan"),
             "hi": float("nan"), "level": float("nan"), "seeds": 6, "images": 1000, "verdict": "",
             "source": f"git history {commit[:7]} (README.md, precision benchmark)",
             "note": f"no interval: mean test CIDEr-D of {len(scores['init'])} runs each, as the README's table "
                     "printed them (x100, one decimal)"}]


def build(out: Path) -> bool:
    """Write the ledger to ``out``; False (nothing written) when the git history is not available."""
    if not history_available():
        return False
    looks = []
    for folder in EXPORTS:
        for line in (git("log", "--format=%H %cI", "--", f"{folder}/report.md") or "").split("\n"):
            if line:
                commit, date = line.split()
                looks += _looks(commit, folder, date)
    looks += _benchmark_look()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.csv"
        for row in sorted(looks, key=lambda r: r["date"]):
            record(path, {k: row.get(k, "") for k in COLUMNS})
        out.write_text(path.read_text())
    return True


if __name__ == "__main__":
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            if not build(Path(tmp) / "ledger.csv"):
                sys.exit("no git history here (a shallow clone?): nothing to check")
            same = (Path(tmp) / "ledger.csv").read_text() == OUT.read_text()
        print("results/ledger.csv is up to date" if same else "results/ledger.csv differs: rerun this script")
        sys.exit(0 if same else 1)
    print(f"wrote {OUT}" if build(OUT) else "no git history here (a shallow clone?): nothing written")
