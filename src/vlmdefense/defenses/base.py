"""The interface every defense implements: ``fit`` (may be a no-op) and ``predict`` (may adapt).

A defense never sees the harness: :meth:`Defense.fit` receives a :class:`~vlmdefense.defenses.fit_data.FitData`
(the frozen base model, the seen-class training images, the evaluation sets, the parameters) and returns
its findings, which the harness stores in the record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from vlmdefense.units import parse_epsilon
from vlmdefense.workbench.evaluation import PassCounter

if TYPE_CHECKING:
    from vlmdefense.defenses.fit_data import FitData
    from vlmdefense.workbench.evaluation import ZeroShotClassifier
    from vlmdefense.workbench.models import LoadedClip

Predictor = Callable[[torch.Tensor], torch.Tensor]


class Defense:
    """A defended ``images -> logits`` pipeline.

    Class attributes:
        id: the catalog id (``baseline`` for the undefended model).
        kind: ``static`` — a deterministic model attacked directly (training-time defenses);
            ``inference`` — the defense acts at inference (test-time and training-free), attacked both
            non-adaptively (through the base model) and adaptively (through :meth:`attack_surface`).
        randomized: the prediction is random; adaptive attacks then average gradients (EOT).
    """

    id: ClassVar[str] = "defense"
    kind: ClassVar[Literal["static", "inference"]] = "static"
    randomized: ClassVar[bool] = False

    def __init__(self) -> None:
        self.counter = PassCounter()

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Defense:
        """An instance configured by a profile's parameters (``create_defense`` calls it); by default
        the parameters are not read."""
        return cls()

    def fit(self, data: FitData) -> dict[str, Any]:
        """Train or calibrate on what the protocol allows (seen classes of the train split); returns
        the findings to record (method-specific measurements)."""
        return {}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for [0, 1] images."""
        raise NotImplementedError

    def attack_surface(self) -> Predictor:
        """What an adaptive attack differentiates: by default the defended pipeline itself."""
        return self.predict

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images)


def override_config(config: Any, params: dict[str, Any]) -> Any:
    """``config`` (a dataclass) with every field that ``params`` names replaced, cast to the field's type.

    A float field also takes ε notation (``'8/255'``); ``None`` in ``params`` leaves a field alone.
    """
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = params.get(f.name)
        if value is None:
            continue
        kind = str(f.type)
        if "bool" in kind:
            value = bool(value)
        elif "int" in kind:
            value = int(value)
        elif "float" in kind and not isinstance(value, str):
            value = float(value)
        elif "float" in kind:
            try:
                value = parse_epsilon(value)[0]
            except ValueError:
                if "str" not in kind:  # a field typed float | str keeps a word such as "calibrate"
                    raise
        changes[f.name] = value
    return dataclasses.replace(config, **changes)


class ConfiguredDefense(Defense):
    """A defense whose hyperparameters are a dataclass: paper defaults, shrunk when the profile says
    ``fast``, then overridden by any parameter of the same name (``vlmdefense run ID -p steps=3``)."""

    config_class: ClassVar[type] = object

    def __init__(self, config: Any = None) -> None:
        super().__init__()
        self.config = config if config is not None else self.default_config()

    @classmethod
    def default_config(cls) -> Any:
        """The method's defaults, scaled to the small CLIP."""
        return cls.config_class()

    @classmethod
    def fast_overrides(cls) -> dict[str, Any]:
        """Budget changes for the quick profile (``fast: true``)."""
        return {}

    @classmethod
    def config_from_params(cls, params: dict[str, Any]) -> Any:
        """Defaults, shrunk when ``params['fast']``, then ``params``' overrides."""
        config = cls.default_config()
        if params.get("fast"):
            config = override_config(config, cls.fast_overrides())
        return override_config(config, params)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Any:
        """An instance configured by :meth:`config_from_params`."""
        return cls(cls.config_from_params(params))

    def hyperparameters(self) -> dict[str, Any]:
        """The configuration as plain values (stored in the findings)."""
        return dataclasses.asdict(self.config)


class InferenceDefense(ConfiguredDefense):
    """A defense that acts at inference on top of the frozen base classifier (bound at ``fit``)."""

    kind = "inference"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.base: ZeroShotClassifier | None = None

    def bind(self, classifier: ZeroShotClassifier) -> None:
        """Use ``classifier`` (frozen) as the base model without the rest of ``fit``."""
        self.base = classifier

    def fit(self, data: FitData) -> dict[str, Any]:
        """Bind the frozen base classifier; nothing is learned."""
        self.bind(data.base)
        return {}

    @property
    def clip(self) -> LoadedClip:
        """The base classifier's CLIP."""
        return self._base().clip

    def _base(self) -> ZeroShotClassifier:
        if self.base is None:
            raise RuntimeError(f"{type(self).__name__}: call fit (or bind) before predicting")
        return self.base
