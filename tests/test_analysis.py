"""Analysis: the verdict's logic and intervals, hyperparameter effects, edge warnings, and the report.

All inputs are constructed with known answers (no training): scores on the 0..1 scale as pycocoevalcap
gives them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import verdict as V
from analysis.effects import compute_effects, edge_warnings
from analysis.report import ReportInputs, VerdictSettings, build_report
from study import registry
from study.registry import Method, method_colors, method_roles, register_method
from tests.helpers import EQUAL, SPACE, history_frame, per_image_frame, runs_frame, trials_frame

METHOD_NAMES = ("init", "pre", "par", "merge", "attention", "none")


def _settings() -> VerdictSettings:
    """The registry's roles and colours as they stand now (a test may register a method), a 2-point margin."""
    return VerdictSettings(method_roles(), method_colors(), margin=0.02)


def test_competes_when_init_equals_best_other_with_many_images():
    per_image = per_image_frame(EQUAL, images=1000, seeds=5, noise=0.1)
    v = V.compute_verdict(per_image, runs_frame(per_image), roles=method_roles(), margin=0.02)
    assert v.best_other == "attention"
    assert v.verdict == V.COMPETES
    assert v.ci[0] < v.diff < v.ci[1]
    assert -0.02 < v.ci[0] and v.ci[1] < 0.02  # tight around the true -0.005
    assert abs(v.diff - (-0.005)) < 0.01
    # The floor is reported but never the comparator; costs sit beside the scores.
    assert v.table.loc["none", "CIDEr-D"] < 0.25
    assert v.table.loc["attention", "params"] == 2e6 and v.table.loc["init", "train_seconds"] == 120.0
    # Only metrics whose corpus score is the per-image mean get intervals; BLEU and METEOR are corpus statistics.
    assert "BLEU-4" not in v.table and "METEOR" not in v.table
    assert v.table.loc["init", "ROUGE-L"] == pytest.approx(v.table.loc["init", "CIDEr-D"] / 2)
    with pytest.raises(ValueError, match="BLEU-4 is a corpus statistic"):
        V.compute_verdict(per_image, roles=method_roles(), margin=0.02, metric="BLEU-4")
    d = v.to_dict()
    assert d["verdict"] == V.COMPETES and d["init.CIDEr-D"] == pytest.approx(v.table.loc["init", "CIDEr-D"])
    assert "competes" in v.text and "attention" in v.text


def test_does_not_compete_when_init_far_below():
    true = dict(EQUAL, init=0.40)
    per_image = per_image_frame(true, images=500, seeds=3, noise=0.1)
    v = V.compute_verdict(per_image, roles=method_roles(), margin=0.02)
    assert v.verdict == V.DOES_NOT_COMPETE
    assert v.ci[1] < -0.02
    assert v.diff == pytest.approx(-0.105, abs=0.015)


def test_inconclusive_with_tiny_noisy_sample():
    per_image = per_image_frame(dict(EQUAL, init=0.48), images=15, seeds=2, noise=0.3, seed_sd=0.03)
    v = V.compute_verdict(per_image, roles=method_roles(), margin=0.02)
    assert v.verdict == V.INCONCLUSIVE
    assert v.ci[0] < -0.02 < v.ci[1]


def test_verdict_is_deterministic_and_ignores_search_floor_as_comparator():
    per_image = per_image_frame(dict(EQUAL, none=0.9), images=200, seeds=3, noise=0.1)
    a = V.compute_verdict(per_image, roles=method_roles(), margin=0.02, seed=7)
    b = V.compute_verdict(per_image, roles=method_roles(), margin=0.02, seed=7)
    assert a.ci == b.ci and a.best_other == "attention"  # "none" scoring highest is still not "other"


def test_bootstrap_interval_covers_true_mean():
    """90%+ of 95% intervals from independent samples of a known distribution contain its mean (the public
    resampling functions every verdict uses, analysis/bootstrap.py)."""
    from analysis.bootstrap import boot_means, interval, resample_weights

    true_mean, covered = 0.4, 0
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        x = rng.exponential(true_mean, size=(3, 200))  # skewed like CIDEr, (S, N); seed effects absent
        image_w = resample_weights(rng, 1000, 200)
        seed_w = resample_weights(rng, 1000, 3)
        lo, hi = interval(boot_means([x], [seed_w], image_w)[0])
        covered += lo <= true_mean <= hi
    assert covered >= 34, covered  # nominal 38 of 40


def test_verdict_without_confirm_results_says_so():
    v = V.compute_verdict(pd.DataFrame(), roles=method_roles(), margin=0.02)
    assert v.verdict == V.NOT_AVAILABLE and "confirm" in v.text
    only_init = per_image_frame({"init": 0.5, "none": 0.2}, images=20, seeds=2, noise=0.1)
    v = V.compute_verdict(only_init, roles=method_roles(), margin=0.02)
    assert v.verdict == V.NOT_AVAILABLE and v.best_other is None and "init" in v.table.index


@pytest.fixture
def extra_method():
    """A method registered for one test only: analysis must pick it up from the registry's data alone."""
    method = register_method(Method("film", "study.models.inject:ParInject", "competitor", False, "#00c8a0"))
    try:
        yield method
    finally:
        del registry.METHODS[method.name]


def test_a_newly_registered_method_competes_and_has_its_colour(extra_method, tmp_path):
    from analysis import plots
    from study.config import TrialConfig

    assert TrialConfig(inject="film").inject == "film"  # a valid config value at once
    per_image = per_image_frame(dict(EQUAL, film=0.53), images=300, seeds=3, noise=0.1)
    v = V.compute_verdict(per_image, roles=method_roles(), margin=0.02)
    assert v.best_other == "film" and v.table.loc["film", "role"] == V.COMPETITOR
    assert list(v.table.index) == ["init", "pre", "par", "merge", "attention", "none", "film"]  # registry order
    # Its bar is drawn in its registered colour (alpha 0.85 over the white background).
    png = plots.plot_methods(v.table, "CIDEr-D", tmp_path / "methods.png", colors=method_colors(), margin=0.02)
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    bar = np.round(0.85 * np.array([0x00, 0xC8, 0xA0]) + 0.15 * 255)
    assert (np.abs(pixels - bar).max(axis=1) <= 2).sum() > 100
    assert plots.method_color("film", method_colors()) == "#00c8a0"


def test_registry_rejects_a_second_target_and_bad_entries():
    with pytest.raises(ValueError, match="one target"):
        register_method(Method("init2", "study.models.inject:InitInject", "target", False, "#000000"))
    with pytest.raises(ValueError, match="rrggbb"):
        register_method(Method("x", "study.models.inject:ParInject", "competitor", False, "teal"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(registry.METHODS["pre"])
    assert set(registry.METHODS) == {"init", "pre", "par", "merge", "attention", "none"}
    with pytest.raises(ValueError, match="exactly one"):
        V.compute_verdict(per_image_frame(EQUAL, images=5, seeds=1, noise=0.1), roles={"pre": "competitor"})


def test_effects_rank_the_driving_parameter_first_and_answer_side_questions():
    e = compute_effects(trials_frame(), SPACE)
    assert e.n_trials == 29  # the errored trial is left out
    assert next(iter(e.importances)) == "dropout"
    assert e.importances["dropout"] > 0.5
    assert set(e.categorical["cell"].index) <= {"lstm", "gru", "lstm_peephole"}
    assert e.categorical["tokens"]["count"].sum() == 29
    assert "word-level" in e.answers["char vs word"] and "character-level" in e.answers["char vs word"]
    assert "peephole LSTM" in e.answers["LSTM vs GRU vs peephole LSTM"]


def test_char_vs_word_answer_gives_bits_per_character():
    t = trials_frame()
    t["val_bpc"] = np.where(t["tokens"] == "char", 1.10, 1.25)
    t.loc[t.index[t["tokens"] == "word"][0], "val_bpc"] = 1.2
    answer = compute_effects(t, SPACE).answers["char vs word"]
    assert answer.endswith("Best val bits per character (lower is better): character-level 1.100, word-level 1.200.")


def test_effects_fall_back_with_too_few_trials():
    e = compute_effects(trials_frame().iloc[1:2], SPACE)
    assert e.importances == {} and any("at least 2" in n for n in e.notes)
    assert compute_effects(pd.DataFrame(), SPACE).n_trials == 0


def test_edge_warning_fires_at_the_edge_and_not_in_the_middle():
    t = pd.DataFrame({"inject": ["init", "init", "pre"], "lr": [1.2e-4, 1e-3, 1e-3], "dropout": [0.25, 0.2, 0.3],
                      "val_CIDEr-D": [0.6, 0.4, 0.5]})
    space = {"lr": SPACE["lr"], "dropout": SPACE["dropout"]}
    warnings = edge_warnings(t, space, "val_CIDEr-D")
    assert [(w.param, w.side) for w in warnings] == [("lr", "low")]  # 1.2e-4 is 4% up the log range
    assert [scope for scope, _ in warnings[0].cases] == ["overall", "init"]  # pre's best (1e-3) is mid-range
    assert "widen" in warnings[0].message
    # On a linear scale 1.2e-4 would also be at the edge, but 1e-3 on a log scale (50%) is not:
    t.loc[0, "lr"] = 1e-3
    assert edge_warnings(t, space, "val_CIDEr-D") == []
    # The high edge of a loss (lower is better) uses the minimum as the best trial.
    t2 = pd.DataFrame({"dropout": [0.48, 0.1], "val_loss": [1.0, 2.0]})
    assert [w.side for w in edge_warnings(t2, {"dropout": SPACE["dropout"]}, "val_loss", by=None)] == ["high"]


def test_report_builds_with_real_pngs(tmp_path):
    per_image = per_image_frame(EQUAL, images=1000, seeds=5, noise=0.1)
    trials = trials_frame()
    img_paths = []
    for i, color in enumerate(["red", "blue"]):
        p = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (300, 200), color).save(p)
        img_paths.append(p)
    gallery = pd.DataFrame([{"image_path": str(p), "method": m, "caption": f"a {m} caption of image {i}",
                             "reference": "a plain coloured rectangle"}
                            for i, p in enumerate(img_paths) for m in METHOD_NAMES])
    out = tmp_path / "report"
    result = build_report(out, "unit", ReportInputs(trials, history_frame(trials), per_image, runs_frame(per_image),
                                                    gallery, space=SPACE, spec_text="name: unit\n"), _settings())
    text = result.path.read_text()
    assert result.verdict.verdict == V.COMPETES
    assert "init competes" in text and "Tanti" in text and "other people's numbers" in text.lower()
    assert [p.name for p in result.images] == ["methods.png", "learning_curves.png", "hyperparameters.png",
                                               "gallery.png"]
    for png in result.images:
        assert f"]({png.name})" in text  # relative link beside the report
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
    html = result.html.read_text()
    assert html.count("data:image/png;base64,") == 4 and "competes" in html
    # What was run: how each method's trials ended, totalled over the trials given
    counts = trials["status"].value_counts().sort_index()
    assert f"| method | {' | '.join(counts.index)} | total |" in text
    assert f"| total | {' | '.join(map(str, counts))} | {len(trials)} |" in text
    # The by-seed table follows the registry's method order, as every other table (it was alphabetical).
    seed_rows = text.split("of every confirm run, by seed:")[1].strip().split("\n\n")[0].splitlines()[2:]
    listed = [row.split("|")[1].strip() for row in seed_rows]
    assert listed == [m for m in method_roles() if m in listed] and len(listed) >= 3


def test_hyperparameter_panels_have_no_overlapping_tick_labels(tmp_path, monkeypatch):
    """A one-decade log axis (lr 5e-4 .. 5e-3) labelled every minor tick: 3x10^-3 and 4x10^-3 overlapped."""
    from analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    space = {"lr": {"type": "loguniform", "low": 5e-4, "high": 5e-3},
             "weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
             "dropout": {"type": "uniform", "low": 0.0, "high": 0.6}}
    rng = np.random.default_rng(0)
    trials = pd.DataFrame({"inject": ["init", "par"] * 10, "status": "completed",
                           "lr": np.exp(rng.uniform(np.log(5e-4), np.log(5e-3), 20)),
                           "weight_decay": np.exp(rng.uniform(np.log(1e-6), np.log(1e-2), 20)),
                           "dropout": rng.uniform(0, 0.6, 20), "val_CIDEr-D": rng.uniform(0.3, 0.5, 20)})
    plots.plot_hyperparameters(trials, space, "val_CIDEr-D", tmp_path / "h.png", colors=method_colors())
    (fig,) = figures
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
        assert len(boxes) >= 2, ax.get_title()
        boxes.sort(key=lambda b: b.x0)
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), (ax.get_title(),
                                                                      [t.get_text() for t in ax.get_xticklabels()])


def test_report_with_empty_inputs_says_so(tmp_path):
    empty = pd.DataFrame()
    result = build_report(tmp_path, "empty", ReportInputs(empty, empty, empty, empty, empty, space={}), _settings())
    text = result.path.read_text()
    assert result.images == [] and result.verdict.verdict == V.NOT_AVAILABLE
    assert "No confirm results" in text and "No search trials" in text and "No example captions" in text


def test_report_states_the_compute_each_method_used(tmp_path):
    """CPU-hours per method: its search epochs' wall time and its confirm runs' wall time, times the CPUs each
    held (here 2 per trial: init's 2 trials x 3 epochs x 600 s = 1 h of wall time = 2 CPU-h in the search)."""
    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "inject": ["init", "init", "par"], "epochs": [3, 3, 1],
                           "status": ["completed", "completed", "stopped"]})
    history = pd.DataFrame([{"trial_id": t, "inject": m, "epoch": e, "epoch_seconds": 600.0}
                            for t, m, n in zip(trials["trial_id"], trials["inject"], trials["epochs"])
                            for e in range(1, n + 1)])
    runs = pd.DataFrame({"method": ["init", "par"], "config_rank": [1, 1], "seed": [0, 0],
                         "seconds": [1800.0, 3600.0], "train_seconds": [1500.0, 3000.0]})
    result = build_report(tmp_path, "cost", ReportInputs(trials, history, runs=runs, space={},
                                                         resources={"cpu": 2, "gpu": 0.5}), _settings())
    text = result.path.read_text()
    # init: 2 trials of 3 epochs = 6 search trial-epochs (what search.epochs_per_arm equalises); par 1 of 1.
    assert "| init | 2 | 6 | 2.00 h | 1 | 1.00 h | 3.00 h | 45.0 min |" in text
    assert "| par | 1 | 1 | 20.0 min | 1 | 2.00 h | 2.33 h | 35.0 min |" in text
    # a quickstart's seconds read as seconds, not as 0.00 h (issue 34, item 9)
    quick = build_report(tmp_path / "quick", "quick", ReportInputs(
        trials, history.assign(epoch_seconds=2.5), runs=runs.assign(seconds=[20.0, 90.0]), space={},
        resources={"cpu": 1}), _settings())
    assert "| init | 2 | 6 | 15 s | 1 | 20 s | 35 s |" in quick.path.read_text()
    assert "| par | 1 | 1 | 2 s | 1 | 1.5 min | 1.5 min |" in quick.path.read_text()


def test_report_shows_each_difference_to_init_the_seeds_the_configurations_anomalies_and_provenance(tmp_path):
    per_image = per_image_frame(EQUAL, images=300, seeds=3, noise=0.1)
    runs = runs_frame(per_image).assign(test_images=300, distinct_captions=280)
    runs.loc[runs["method"] == "none", "distinct_captions"] = 1  # an image-blind decoder: one caption for all
    confirmed = pd.DataFrame({"method": ["init", "pre"], "config_rank": [1, 1], "trial_id": ["a1b2", "c3d4"],
                              "cell": ["lstm", "gru"], "hidden": [512, 256], "lr": [0.0021, 0.0009]})
    result = build_report(tmp_path, "unit", ReportInputs(per_image=per_image, runs=runs, confirmed=confirmed, space={},
                                                         provenance={"git commit": "abc123", "torch": "2.13.0"}),
                          _settings())
    text = result.path.read_text()
    pairwise = result.verdict.pairwise
    assert set(pairwise.index) == set(METHOD_NAMES) - {"init"}
    assert (pairwise["lo"] < pairwise["diff"]).all() and (pairwise["diff"] < pairwise["hi"]).all()
    assert pairwise.loc["none", "lo"] > 0.2  # init far above the floor
    assert f"| none | {100 * pairwise.loc['none', 'diff']:.1f} |" in text
    assert "none: at most 1 distinct caption(s) for 300 test images in each of its 3 runs" in text
    assert "pre: at most" not in text
    assert "| init | 1 | a1b2 | lstm | 512 | 0.0021 |" in text
    assert "| method | rank | seed 0 | seed 1 | seed 2 |" in text
    assert "| git commit | abc123 |" in text


def test_corpus_scores_are_each_runs_corpus_score_over_seeds_in_registry_order():
    from analysis.scores import corpus_rows, corpus_scores

    runs = pd.DataFrame({"method": ["pre", "init", "init", "extra"], "config_rank": 1, "seed": [0, 0, 1, 0],
                         "BLEU-4": [0.19, 0.20, 0.22, 0.1], "CIDEr-D": [0.47, 0.50, 0.52, 0.3]})
    table = corpus_scores(runs, order=["init", "pre"])
    assert list(table["method"]) == ["init", "pre", "extra"] and list(table["seeds"]) == [2, 1, 1]
    assert table.loc[0, "BLEU-4_mean"] == pytest.approx(0.21)
    assert table.loc[0, "BLEU-4_std"] == pytest.approx(np.std([0.20, 0.22], ddof=1))
    header, rows = corpus_rows(table)
    assert header == ["method", "seeds", "BLEU-4", "CIDEr-D"]
    assert rows[0] == ["init", "2", "21.0 ± 1.4", "51.0 ± 1.4"] and rows[1][2] == "19.0"  # one seed: no sd


def test_training_length_tells_a_curve_still_rising_from_a_flat_one_over_the_last_quarter(tmp_path):
    from analysis.render import to_markdown
    from analysis.training_length import length_blocks, length_table

    rows = []
    for seed, offset in enumerate((0.0, 0.004)):
        for epoch in range(1, 13):
            # par: +1 point an epoch to the end (+3 over the last quarter); init: peaks at epoch 8, then flat.
            rows.append({"method": "par", "config_rank": 1, "seed": seed, "epoch": epoch, "current_lr": 1e-3,
                         "val_CIDEr-D": 0.30 + 0.01 * epoch + offset})
            rows.append({"method": "init", "config_rank": 1, "seed": seed, "epoch": epoch, "current_lr": 1e-3,
                         "val_CIDEr-D": 0.40 + 0.01 * min(epoch, 8) - 0.001 * (epoch == 12) + offset})
    # A third seed of init still training (epoch 5 of 12): only the epochs every seed reached count.
    rows += [{"method": "init", "config_rank": 1, "seed": 2, "epoch": e, "current_lr": 1e-3, "val_CIDEr-D": 0.1}
             for e in range(1, 6)]
    table = length_table(pd.DataFrame(rows)).set_index("method")
    assert table.loc["par", "rising"] and table.loc["par", "gain"] == pytest.approx(0.03)
    assert table.loc["par", "tail"] == 3 and table.loc["par", "best_epoch"] == 12
    assert table.loc["init", "epochs"] == 5 and table.loc["init", "seeds"] == 3  # cut to the slowest seed
    full = length_table(pd.DataFrame([r for r in rows if r["seed"] < 2])).set_index("method")
    # A curve that peaked early and ends a little above where it was a quarter before the end: not rising.
    noisy = [{**r, "val_CIDEr-D": 0.5 - 0.02 * (r["epoch"] > 6) + 0.01 * (r["epoch"] == 12)}
             for r in rows if r["method"] == "init" and r["seed"] < 2]
    late = length_table(pd.DataFrame(noisy)).iloc[0]
    assert late["gain"] >= 0.005 and late["best_epoch"] <= 6 and not late["rising"]
    assert not full.loc["init", "rising"] and full.loc["init", "best_epoch"] == 8
    assert full.loc["init", "gain"] == pytest.approx(-0.001)
    text = to_markdown(length_blocks(pd.DataFrame([r for r in rows if r["seed"] < 2]), tmp_path), tmp_path)
    assert "Still rising at the end of training: par (peak at epoch 12, +3.0 over its last 3 epochs)" in text
    assert "| init | 1 | 2 | 12 | 8 | 48.2 | 48.1 | -0.1 (last 3) | no |" in text
    assert (tmp_path / "confirm_curves.png").stat().st_size > 10_000
