"""The README and the docs site: the site builds with warnings as errors (so a broken link or anchor fails), every
link in the README leads to a file of the repository, and the numbers the docs quote from the committed exports
in results/ are the exports' numbers."""

from __future__ import annotations

import csv
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

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


def test_the_answers_tables_are_the_committed_exports_numbers():
    answer = (DOCS / "answer.md").read_text()
    report = (FLICKR8K / "report.md").read_text()
    # init minus each method on both test sets: the report's two tables
    quoted = _by_method(_md_table(answer, "| method | Flickr8k test"))
    on_flickr = _by_method(_md_table(report, "| method | init - method"))
    on_coco = _by_method(_md_table(_section(report, "init minus each method on coco-mini"), "| method | init - method"))
    assert set(quoted) == set(on_flickr) == set(on_coco)
    for method, row in quoted.items():
        flickr, coco = on_flickr[method], on_coco[method]
        assert row["Flickr8k test (1000 photos)"] == f"{flickr['init - method']} {flickr['95% CI']}", method
        assert row["coco-mini (308 photos)"] == f"{coco['init - method']} {coco['95% CI']}", method
    # test scores on Flickr8k (test_scores.md) and on coco-mini (the report's table), mean ± sd over seeds
    for heading, exported in (("| method | configuration | BLEU-1", (FLICKR8K / "test_scores.md").read_text()),
                              ("| method | BLEU-1 | BLEU-4 | METEOR", _section(report, "Corpus-level scores on coco"))):
        quoted = _by_method(_md_table(answer, heading))
        scores = _by_method(_md_table(exported, "| method | seeds"))
        assert set(quoted) == set(scores)
        for method, row in quoted.items():
            for metric in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
                assert row[metric].replace("**", "") == scores[method][metric], (heading, method, metric)


def test_the_pooled_answer_in_the_readme_and_the_docs_is_the_export():
    with open(FLICKR8K / "pooled_verdict.csv") as f:
        pooled = {row["set"]: row for row in csv.DictReader(f)}
    sets = {name.split()[0]: row for name, row in pooled.items()}
    x100 = {key: {k: f"{100 * float(row[k]):.1f}" for k in ("diff", "lo", "hi")} for key, row in sets.items()}
    p = x100["pooled"]
    interval = f"{p['diff']} [{p['lo']}, {p['hi']}]"
    assert interval == "-1.3 [-3.1, 0.6]"
    readme = (REPO / "README.md").read_text()
    answer = (DOCS / "answer.md").read_text()
    assert f"`init - attention` is {interval}" in readme and f"`init - attention` = **{interval}**" in answer
    flickr, coco = (str(abs(float(x100[s]["diff"]))) for s in ("flickr8k", "coco-mini"))
    for text in (readme, answer):
        flat = " ".join(text.split())
        assert f"scores {flickr} CIDEr-D points below the best method (`attention`)" in flat
        assert f"{coco} below" in flat


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
    modules = [p for folder in ("study", "analysis", "study/tuning") for p in (REPO / folder).glob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    names = {p: (f"`{p.relative_to(REPO)}`", f"`{p.name}`", f"`{p.stem}`") for p in modules}
    missing = [str(p.relative_to(REPO)) for p, forms in names.items() if not any(f in table for f in forms)]
    assert not missing, f"docs/architecture.md's table does not list {missing}"
