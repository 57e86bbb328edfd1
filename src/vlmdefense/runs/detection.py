"""The detection section of a result record (``Result.detection``, by variant): what a detector (MirrorCheck)
measured beside the classifier's clean and robust accuracy."""

from __future__ import annotations

from pydantic import Field

from vlmdefense.runs.record_base import Record
from vlmdefense.units import Epsilon, Percent


class DetectionRow(Record):
    """Detection of one attack at one ε (the scores of the attacked test images against the clean ones)."""

    attack: str
    eps: Epsilon
    steps: int = Field(ge=0)
    adaptive: bool = Field(description="the attack saw the detector (joint attack) or only the undefended model")
    target: str = Field(description="what the attack differentiated: base-model or classifier-and-detector")
    attacked_images: int = Field(ge=0)
    adversarial_images: int = Field(
        ge=0, description="attacked images that fool the classifier (correct when clean, wrong when attacked)"
    )
    attack_success: Percent = Field(description="adversarial_images over the correctly classified clean images")
    auroc: float | None = Field(
        None, ge=0, le=1, description="clean test images against the adversarial ones; None when there are none"
    )
    tpr_at_5_fpr: Percent | None = Field(None, description="share of adversarial images flagged at 5 % clean FPR")
    threshold_at_5_fpr: float | None = Field(None, description="the score below which 5 % of clean images lie")
    detection_rate: Percent | None = Field(None, description="share of adversarial images flagged at the deployed τ")
    evading: Percent = Field(description="share of attacked images that fool the classifier and are not flagged")
    accuracy_after_rejection: Percent = Field(description="share of attacked images flagged or classified correctly")
    mean_score: float | None = Field(None, description="mean detector score of the adversarial images")
    seconds: float | None = None


class DetectionSection(Record):
    """A detector's operating point on clean data and its detection of each attack."""

    score: str = Field(description="what the detector scores (higher: more likely clean)")
    threshold: float = Field(description="the deployed τ: inputs scoring strictly below it are flagged")
    threshold_rule: str = Field(description="how τ was chosen, and on which (never test) images")
    clean_images: int = Field(ge=0)
    clean_accuracy: Percent = Field(description="the classifier's accuracy on the clean test images")
    clean_false_positive_rate: Percent = Field(description="share of clean test images flagged at τ")
    clean_accuracy_after_rejection: Percent = Field(description="correct and not flagged, over all clean images")
    mean_clean_score: float
    stochastic: bool = Field(False, description="the detector draws encoders and weight noise per query")
    rows: list[DetectionRow] = Field(default_factory=list)
    definitions: str = Field("", description="the metrics' definitions, in words")

    def row(self, attack_prefix: str, eps_display: str, adaptive: bool) -> DetectionRow | None:
        """The first row whose attack starts with ``attack_prefix`` at ``eps_display`` of that kind."""
        return next(
            (
                r
                for r in self.rows
                if r.attack.startswith(attack_prefix) and r.eps.display == eps_display and r.adaptive == adaptive
            ),
            None,
        )
