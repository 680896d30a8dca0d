"""The package's shape, checked from its source: imports go one way, and modules and functions stay readable."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("study", "analysis")
MAX_MODULE_LINES = 360  # "about 350" (issue 19): a module reads in one sitting
MAX_FUNCTION_LINES = 50  # "about 50" (issue 30): from `def` to its last line, docstring included


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages (a package is its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:``: imports for annotations, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the project's modules it imports, at the top or inside a function (both run)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:  # `from study import tuning` imports the module study.tuning
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_study_or_analysis():
    graph = import_graph()
    assert "study.study" in graph and "study.records.frames" in graph["study.study"]  # the graph sees real imports
    assert cycles(graph) == []


def test_the_facade_is_the_top_only_the_cli_and_the_package_import_it():
    importers = {name for name, targets in import_graph().items() if "study.study" in targets}
    allowed = {"study", "study.__main__"} | {m for m in import_graph() if m.startswith("study.cli")}
    assert importers <= allowed, importers


# The layers, from the top: the command line (study.cli), the façade (study.study) and its context, the stages
# (study.stages, and the search: study.tuning), and below them the records (study.records: what one stage writes
# and another reads), the tracker (study.tracking), one trial (study.trial), the models, the data and the configs.
STAGES = {"study.tuning"} | {m for m in _modules() if m.startswith("study.stages.")}
BELOW_THE_STAGES = ("study.records", "study.tracking", "study.trial", "study.models", "study.data")


def test_the_layers_below_the_stages_import_no_stage_no_facade_and_no_command_line():
    graph = import_graph()
    below = [m for m in graph if m.startswith(BELOW_THE_STAGES)]
    assert len(below) > 30 and graph["study.records"] and graph["study.tracking"]  # the graph sees them and imports
    for module in below:
        above = {t for t in graph[module]
                 if _stage(t) or t in ("study.study", "study.context") or t.startswith("study.cli")}
        assert not above, (module, sorted(above))


def _stage(module: str) -> str | None:
    return next((stage for stage in STAGES if module == stage or module.startswith(stage + ".")), None)


def test_no_stage_imports_another():
    graph = import_graph()
    edges = {(_stage(name), _stage(target)) for name, targets in graph.items() if _stage(name)
             for target in targets if _stage(target) and _stage(target) != _stage(name)}
    assert not edges, sorted(edges)


def test_analysis_is_pure_and_imports_nothing_of_the_platform():
    graph = import_graph()
    leaks = {name: sorted(t for t in targets if t.startswith("study")) for name, targets in graph.items()
             if name.startswith("analysis")}
    assert not any(leaks.values()), leaks


def test_modules_and_functions_stay_readable_in_one_sitting():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            long_modules.append((name, len(source.splitlines())))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append((f"{name}.{node.name}", length))
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from ray import tune`
    return names


def test_mlflow_is_called_from_one_module_and_ray_tune_from_one_package():
    mlflow_users, tune_users = set(), set()
    for name, path in _modules().items():
        imported = _third_party_imports(path)
        if any(m == "mlflow" or m.startswith("mlflow.") for m in imported):
            mlflow_users.add(name)
        if any(m == "ray.tune" or m.startswith("ray.tune.") for m in imported) and not name.startswith("study.tuning"):
            tune_users.add(name)
    assert mlflow_users == {"study.tracking.mlflow_store"}
    assert not tune_users, tune_users


# Where JSON is parsed above the records layer, and why none of it is a record one stage writes and another reads:
# those are parsed in study/records alone, typed (issue 30: no stage reads another stage's raw JSON). The search
# (study/tuning) parses only its own and Tune's state, which the others read through study.records.trial_tables.
JSON_PARSED_ABOVE_THE_RECORDS = {
    "study.stages.confirm": 1,  # a config's JSON round trip, no file
    "study.stages.evaluate": 1,  # the dataset JSON the user names, for the set's name
    "study.stages.report": 1,  # a frame's values as JSON for MLflow, no file
    "study.stages.reproduce": 1,  # an export folder's provenance.json, not a study folder's file
}


def test_only_the_records_layer_parses_what_a_stage_wrote():
    above = ("study.stages", "study.cli", "study.study", "study.context", "study.profiling", "study.leaderboard")
    found = {}
    for name, path in _modules().items():
        if name.startswith(above):
            calls = [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                     and ast.unparse(node.func) in ("json.loads", "json.load")]
            if calls:
                found[name] = len(calls)
    assert found == JSON_PARSED_ABOVE_THE_RECORDS


def test_no_test_module_imports_another_what_they_share_is_in_helpers():
    borrowed = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("tests.test_", "conftest")) \
                    and node.module != f"tests.{path.stem}":
                borrowed.setdefault(path.name, []).append(node.module)
    assert not borrowed, borrowed
