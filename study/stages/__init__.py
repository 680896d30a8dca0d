"""The stages, one module each, every one a function of a study's context (``study.context.StudyContext``) that
reads what the one before wrote through ``study.records`` and imports no other stage (the search is
``study.tuning``, which holds every Ray Tune import):

    confirm.py    the best configurations retrained with seeds, scored on the test split   (study confirm)
    decide.py     more seeds under a sequential plan until the verdict is decided          (study decide)
    evaluate.py   the confirm models scored on another dataset's photos                    (study evaluate)
    report.py     the verdict with intervals, figures, provenance, MLflow evidence         (study report)
    export.py     what a study produced, copied into a folder of a repository              (study export)
    reproduce.py  one confirm run of an export retrained and compared                      (study reproduce)

A new stage is a module here plus a ``Study`` method (``study/study.py``) and a command (``study/cli/``).
"""
