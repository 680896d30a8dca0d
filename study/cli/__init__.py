"""The command line: ``study`` (``app.py``: the app, ``main`` and the commands on a study), what they share
(``study_commands.py``: opening and locking a study), the commands on one configuration (``trial_commands.py``:
data, features, train, caption, reproduce) and ``study evaluate`` (``evaluate_command.py``). Thin shells over
``study.Study``.
"""

from study.cli.app import app, main

__all__ = ["app", "main"]
