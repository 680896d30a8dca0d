"""caption-study: a Ray Tune study of recurrent image captioners (memory seeding vs the other injections)."""

__version__ = "0.1.0"


def load(study: str, storage: str | None = None):
    """Open a study's results as pandas frames: ``study.load("quickstart").leaderboard()``; see
    :mod:`study.records.frames` (imported on first use, so ``import study`` stays light)."""
    from study.study import load as _load

    return _load(study, storage)
