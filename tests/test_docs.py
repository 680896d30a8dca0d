"""The README and the docs site: the site builds with warnings as errors (so a broken link or anchor fails), every
link in the README leads to a file of the repository, and the numbers the docs quote from the committed exports
in results/ are the exports' numbers."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest

from tests.helpers import REPO

DOCS = REPO / "docs"
FLICKR8K = REPO / "results" / "flickr8k"


def test_the_docs_site_builds_strict_into_a_folder_of_its_own(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"),
                            "-d", str(site)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert built.returncode == 0, built.stderr
    assert "WARNING" not in built.stderr
    # every page of docs/ becomes a page of the site, the ones in the menu and any added without a nav entry
    for page in DOCS.glob("*.md"):
        name = "" if page.stem == "index" else page.stem + "/"
        assert (site / name / "index.html").is_file(), page.name
    answer = (site / "answer" / "index.html").read_text()
    assert "The answer on Flickr8k" in answer and "<table>" in answer


def test_a_page_added_without_a_nav_entry_still_builds_strict(tmp_path):
    """Other branches add pages to docs/ (statistics.md, ...): a page not in mkdocs.yml's nav must not fail CI."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for page in DOCS.glob("*.md"):
        (docs / page.name).write_text(page.read_text())
    (docs / "added-later.md").write_text("# Added later\n\nSee [the answer](answer.md).\n")
    config = (REPO / "mkdocs.yml").read_text()
    (tmp_path / "mkdocs.yml").write_text(config)
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "site" / "added-later" / "index.html").is_file()
    # ... and a broken link in it does fail
    (docs / "added-later.md").write_text("# Added later\n\nSee [nothing](no-such-page.md).\n")
    broken = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site2")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert broken.returncode != 0 and "no-such-page.md" in broken.stderr


def test_every_link_in_the_readme_leads_to_a_file_of_the_repository():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert links, "the README links to its docs"
    for link in links:
        if "://" in link:
            continue
        assert (REPO / link).exists(), f"README.md links to {link}, which does not exist"
    assert len(readme.splitlines()) < 150, "the README stays a few screens; the rest goes to docs/"


def _md_table(text: str, header_start: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table whose header row starts with header_start."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [rows[0]] + rows[2:]


def _by_method(rows: list[list[str]]) -> dict[str, dict[str, str]]:
    header = rows[0]
    return {row[0].strip("`"): dict(zip(header, row)) for row in rows[1:]}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    return text[start:]


def _export_verdicts() -> dict[str, dict[str, str]]:
    """verdicts.csv of the committed export: one row per set (and ``pooled``), keyed by the set's first word."""
    with open(FLICKR8K / "verdicts.csv") as f:
        return {row["set"].split()[0]: row for row in csv.DictReader(f)}


def _interval(row: dict[str, str]) -> str:
    shown = {k: f"{float(row[k]):.1f}" for k in ("diff", "lo", "hi")}  # the export's CSVs hold points
    return f"{shown['diff']} [{shown['lo']}, {shown['hi']}]"


def test_the_answers_tables_are_the_committed_exports_numbers():
    answer = (DOCS / "answer.md").read_text()
    report = (FLICKR8K / "report.md").read_text()
    target = _export_verdicts()["flickr8k"]["target"]
    # the target minus each arm on both test sets: the report's two tables
    column = f"| method | {target} - method"
    quoted = _by_method(_md_table(answer, "| method | Flickr8k test"))
    on_flickr = _by_method(_md_table(report, column))
    on_coco = _by_method(_md_table(_section(report, f"{target} minus each method on coco-mini"), column))
    assert set(quoted) == set(on_flickr) == set(on_coco) and len(quoted) == 5
    level = next(k for k in on_flickr[next(iter(on_flickr))] if k.endswith("% CI"))
    for method, row in quoted.items():
        flickr, coco = on_flickr[method], on_coco[method]
        assert row["Flickr8k test (1000 photos)"] == f"{flickr[f'{target} - method']} {flickr[level]}", method
        assert row["coco-mini (308 photos)"] == f"{coco[f'{target} - method']} {coco[level]}", method
    # test scores on Flickr8k (test_scores.md) and on coco-mini (the report's table), mean ± sd over seeds
    for heading, exported in (("| method | seeds | BLEU-1 | BLEU-4", (FLICKR8K / "test_scores.md").read_text()),
                              ("| method | BLEU-1 | BLEU-4 | METEOR", _section(report, "Corpus-level scores on coco"))):
        quoted = _by_method(_md_table(answer, heading))
        scores = _by_method(_md_table(exported, "| method | seeds"))
        assert set(quoted) == set(scores) and len(quoted) == 6
        for method, row in quoted.items():
            for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "seeds"):
                if metric in row:
                    assert row[metric].replace("**", "") == scores[method][metric], (heading, method, metric)


def test_the_verdicts_in_the_readme_and_the_docs_are_the_export():
    verdicts = _export_verdicts()
    flickr, coco, pooled = verdicts["flickr8k"], verdicts["coco-mini"], verdicts["pooled"]
    pair = f"`{flickr['target']} - {flickr['comparator']}`"
    assert flickr["comparator"] == pooled["comparator"] == coco["comparator"] == "par"  # comparator.json's
    assert _interval(flickr) == "-1.8 [-3.9, 0.5]" and _interval(pooled) == "-1.6 [-3.4, 0.4]"
    readme = " ".join((REPO / "README.md").read_text().split())
    answer = " ".join((DOCS / "answer.md").read_text().split())
    assert f"{pair} is {_interval(flickr)}" in readme and f"{pair} is {_interval(pooled)}" in readme
    assert f"{pair} is **{_interval(flickr)}**" in answer and f"{pair} = **{_interval(pooled)}**" in answer
    assert f"and {_interval(coco)} on 308 COCO photos" in answer
    # the target's and the best arm's test CIDEr-D as test_scores.csv has them
    with open(FLICKR8K / "test_scores.csv") as f:
        rows = {row["method"]: row for row in csv.DictReader(f)}
    cider = {m: f"{float(r['CIDEr-D_mean']):.1f}" for m, r in rows.items()}
    best = max(cider, key=lambda m: float(cider[m]))
    assert best == "attention"
    for text in (readme, answer):
        assert f"scores CIDEr-D {cider[flickr['target']]}" in text or f"CIDEr-D {cider[flickr['target']]} on" in text
        assert f"{cider[best]}" in text
    # the margin table: the words at every margin, and the deciding margin read off the interval
    assert f"above {-float(flickr['lo']):.1f} points on Flickr8k" in answer
    with open(FLICKR8K / "margins.csv") as f:
        assert {row["verdict"] for row in csv.DictReader(f)} == {"inconclusive"}
    # the decide looks the answer lists are decide.json's
    import json

    looks = json.loads((FLICKR8K / "decide.json").read_text())["looks"]  # the study's record: 0..1
    listed = ", ".join(f"{100 * look['diff']:.1f}" for look in looks[:-1]) + f" and {100 * looks[-1]['diff']:.1f}"
    assert f"{listed} at 3, 4, 5 and 6 seeds" in answer


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_no_page_quotes_a_test_count_by_hand(page):
    """A typed count of tests goes stale with the next test added (the README once said 275 where pytest
    collected 346): the docs say what the suite covers, not how many tests it has."""
    assert not re.search(r"\b\d+ tests\b", (DOCS / page).read_text())


def test_the_architecture_table_names_every_module():
    """docs/architecture.md's layout table lists every module of study/ and analysis/ (by path, or by name in its
    package's row), so a newcomer finds each file's job from the docs and a new module cannot go unlisted."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text[text.index("| path | what |"):]
    folders = ("study", "analysis", "study/tuning", "study/cli", "study/stages", "study/records", "study/tracking",
               "study/trial")
    modules = [p for folder in folders for p in (REPO / folder).glob("*.py") if p.name != "__main__.py"
               and (p.name != "__init__.py" or folder in ("study/records", "study/tracking"))]  # those two hold code
    names = {p: (f"`{p.parent.relative_to(REPO)}/`",) if p.name == "__init__.py" else
             (f"`{p.relative_to(REPO)}`", f"`{p.name}`", f"`{p.stem}`") for p in modules}
    missing = [str(p.relative_to(REPO)) for p, forms in names.items() if not any(f in table for f in forms)]
    assert not missing, f"docs/architecture.md's table does not list {missing}"


def test_every_interval_of_the_committed_answer_is_recomputed_from_its_export():
    """Issue 32's reviewer check: `study verify results/flickr8k` recomputes each interval and verdict cell from the
    exported per-image scores alone, and finds every one equal."""
    from typer.testing import CliRunner

    from study.cli.app import app

    verified = CliRunner().invoke(app, ["verify", str(FLICKR8K)])
    assert verified.exit_code == 0, verified.output
    assert "verified: all 243 cells" in " ".join(verified.output.split())


def test_the_answers_other_numbers_are_the_exports():
    """The reproduced runs' scores, the comparator's validation scores, the measured hours and each arm's search
    spend, as docs/answer.md quotes them, are what results/flickr8k holds."""
    import json

    answer = " ".join((DOCS / "answer.md").read_text().split())
    with open(FLICKR8K / "confirm_runs.csv") as f:
        runs = {row["run"]: row for row in csv.DictReader(f)}
    for run in ("seed-r1-s0", "attention-r1-s0"):
        scores = ", ".join(f"{metric} {float(runs[run][metric]):.2f}" for metric in ("CIDEr-D", "BLEU-4", "METEOR"))
        assert f"`study reproduce results/flickr8k {run}`" in answer and f"({scores})" in answer, run
    chosen = json.loads((FLICKR8K / "comparator.json").read_text())["values"]  # the study's record: 0..1
    assert chosen["par"] == max(chosen.values())
    val = {m: f"{100 * v:.1f}" for m, v in chosen.items()}
    assert f"`par` led ({val['par']} against {val['init']} for `init` and {val['attention']} for `attention`)" in answer
    provenance = json.loads((FLICKR8K / "provenance.json").read_text())
    hours, epochs, trial_hours = re.match(r"([\d.]+ h) while trials trained \((\d+) trial-epochs, ([\d.]+ h)",
                                          provenance["search wall time"]).groups()
    assert f"search {hours} of wall time ({epochs} trial-epochs, {trial_hours} of trial time" in answer
    confirm_wall, confirm_runs, run_hours = re.match(r"(.+) \((\d+) runs, ([\d.]+ h) of run time\)",
                                                     provenance["confirm wall time"]).groups()
    assert f"{confirm_wall} ({confirm_runs} runs, {run_hours} of run time)" in answer
    # each arm's search trial-epochs: the report's compute table
    report = (FLICKR8K / "report.md").read_text()
    spend = {row[0]: row[2] for row in _md_table(report, "| method | search trials | search trial-epochs")[1:]}
    listed = ", ".join(f"`{arm}` {spend[arm]}" for arm in ("attention", "init", "merge", "par", "pre", "seed"))
    assert f"(trial-epochs: {listed})" in answer
    stopped = re.search(r"\| total \| (\d+) \| (\d+) \| (\d+) \|", report).groups()
    assert f"ASHA stopped {stopped[1]} of {stopped[2]} trials" in answer
