"""Equal search compute per arm: each arm's trial-epochs counted, shared by the searcher and the scheduler."""

from __future__ import annotations

from typing import Any


class ArmBudget:
    """The search compute each arm has spent, in trial-epochs (``search.epochs_per_arm``): the epochs each of its
    trials has trained (a resumed trial's epochs count once). The searcher proposes no trial for an arm that has
    spent it, and the scheduler stops the arm's running trials when it is spent, so arms end within a trial-epoch
    or so of each other per trial running at once. Shared by the two (Tune pickles them together); its state
    travels in the searcher's JSON."""

    def __init__(self, per_arm: int | None):
        self.per_arm = per_arm
        self.epochs: dict[str, dict[str, int]] = {}  # arm -> Tune trial id -> epochs trained

    def record(self, arm: str, trial_id: str, epoch: Any) -> None:
        if isinstance(epoch, (int, float)) and epoch == epoch:
            trials = self.epochs.setdefault(arm, {})
            trials[trial_id] = max(trials.get(trial_id, 0), int(epoch))

    def spent(self, arm: str) -> int:
        return sum(self.epochs.get(arm, {}).values())

    def exhausted(self, arm: str) -> bool:
        return self.per_arm is not None and self.spent(arm) >= self.per_arm

    def room(self, arm: str, running: int) -> bool:
        """Whether a new trial fits: each running trial will train at least one more epoch."""
        return self.per_arm is None or self.spent(arm) + running < self.per_arm

    def load(self, epochs: dict[str, dict[str, int]]) -> None:
        self.epochs.clear()  # in place: the scheduler holds this same object
        self.epochs.update({arm: {str(t): int(e) for t, e in trials.items()} for arm, trials in epochs.items()})
