"""Model selection: which epoch's weights a run keeps, decided on the source domains only.

A rule is a named object (DomainBed's ``model_selection``): it says which source-validation
criteria it needs and turns an epoch's criteria into a score; the trainer keeps the epoch with
the highest score (the first one on ties) and every final record names the rule and the epoch.
No rule ever sees a target-domain image.

Criteria the trainer computes on source validation (fractions in [0, 1]):

- ``closed_acc``: accuracy of the argmax over the C known classes. It neither rewards nor
  punishes rejection, so it is the recognition criterion (``val_acc``); the (C+1)-way known
  accuracy would reward a model that never says "unknown".
- ``acc_known``, ``acc_unknown``, ``h_score``: the (C+1)-way decision on source-val knowns and
  on held-out pseudo-unknowns made from source-*validation* images (never training features).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from seeclip.registry import Registry


@dataclass(frozen=True)
class Selection:
    """A model-selection rule: the criterion it maximises over epochs (None = last epoch)."""

    name: str
    criterion: str | None  # key of the per-epoch criteria; None keeps the last epoch
    needs_val_pseudo: bool  # True when the criterion needs held-out pseudo-unknowns
    description: str

    def score(self, criteria: Mapping[str, float]) -> float | None:
        """The epoch's score (higher is better), or None when the rule does not compare."""
        if self.criterion is None:
            return None
        if self.criterion not in criteria:
            raise KeyError(f"selection {self.name!r} needs criterion {self.criterion!r}")
        return float(criteria[self.criterion])


SELECTIONS: Registry[Selection] = Registry("model selection")
for _rule in (
    Selection("last", None, False, "the last epoch's weights (no validation)"),
    Selection(
        "val_acc",
        "closed_acc",
        False,
        "best closed-set accuracy on source validation (rejection plays no part)",
    ),
    Selection(
        "val_h",
        "h_score",
        True,
        "best H of source-val known accuracy and rejection of pseudo-unknowns made from "
        "source-val images",
    ),
):
    SELECTIONS.add(_rule.name, _rule)


def get_selection(name: str) -> Selection:
    """The rule called ``name``; an unknown name lists the known ones."""
    return SELECTIONS.get(name)


OWN_RULE = "own"  # the method's own decision rule (argmax over C+1, or its source-val quantile)


@dataclass(frozen=True)
class SettingSelection:
    """A rule that picks a setting and an operating rule from validation reports (LODO folds).

    A report (:func:`seeclip.validation.run_lodo`) has ``mean[<metric>]`` under the method's
    own rule and ``mean[<metric>_lodo_threshold]`` under the threshold calibrated on the other
    folds; the pair with the highest mean wins, the first declared on ties.
    """

    name: str
    metric: str  # the fold metric maximised
    description: str

    def choose(self, reports: Mapping[str, Mapping]) -> tuple[str, str, float]:
        """(setting label, operating rule, its mean fold score) of the best pair."""
        best: tuple[float, str, str] | None = None
        for label, report in reports.items():
            keys = ((OWN_RULE, self.metric), ("lodo_threshold", f"{self.metric}_lodo_threshold"))
            for rule, key in keys:
                value = report["mean"].get(key)
                if value is not None and (best is None or value > best[0]):
                    best = (float(value), label, rule)
        if best is None:
            raise ValueError(f"selection {self.name}: no report has a {self.metric} mean")
        return best[1], best[2], best[0]


SETTING_SELECTIONS: Registry[SettingSelection] = Registry("setting selection")
SETTING_SELECTIONS.add(
    "lodo_h",
    SettingSelection("lodo_h", "h_score", "best mean H over the LODO folds of the sources"),
)


__all__ = [
    "OWN_RULE",
    "SELECTIONS",
    "SETTING_SELECTIONS",
    "Selection",
    "SettingSelection",
    "get_selection",
]
