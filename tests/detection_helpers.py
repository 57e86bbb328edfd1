"""A detection section with one adaptive row, for the tests of records and of the site."""

from __future__ import annotations

from vlmdefense.runs.detection import DetectionRow, DetectionSection
from vlmdefense.units import Epsilon


def detection_section(attack: str = "joint PGD-10") -> DetectionSection:
    """A deployed detector's section: its clean threshold and one joint adaptive row at 8/255."""
    row = DetectionRow(
        attack=attack,
        eps=Epsilon.parse("8/255"),
        steps=10,
        adaptive=True,
        target="classifier-and-detector",
        attacked_images=60,
        adversarial_images=58,
        attack_success=100.0,
        auroc=0.5882,
        tpr_at_5_fpr=5.17,
        threshold_at_5_fpr=0.2,
        detection_rate=20.69,
        evading=80.0,
        accuracy_after_rejection=20.0,
    )
    return DetectionSection(
        score="mean cosine",
        threshold=0.4603,
        threshold_rule="equal_tpr_tnr on training images",
        clean_images=60,
        clean_accuracy=96.67,
        clean_false_positive_rate=20.0,
        clean_accuracy_after_rejection=78.33,
        mean_clean_score=0.58,
        rows=[row],
    )
