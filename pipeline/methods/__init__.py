"""Training methods, each a small component over the shared loop (pipeline.train).

==============  ==========================  ============================================
stage           method                      learns from
==============  ==========================  ============================================
source_only     SourceOnly                  labelled source images
oracle          Oracle                      labelled target images (an upper bound)
adversarial     Adversarial                 labelled source + unlabelled target images
self_training   IAST, or HIAST with a       target images and a label store of
                teacher_momentum            pseudo-labels
stvm            STvM                        unlabelled target images only (source-free)
==============  ==========================  ============================================
"""

from pipeline.methods.adversarial import Adversarial
from pipeline.methods.base import Method, StepContext, uses_amp
from pipeline.methods.iast import HIAST, IAST
from pipeline.methods.stvm import STvM, STvMConfig
from pipeline.methods.supervised import Oracle, SourceOnly

_BY_STAGE: dict[str, type[Method]] = {
    "source_only": SourceOnly,
    "oracle": Oracle,
    "adversarial": Adversarial,
    "self_training": IAST,
    "stvm": STvM,
}


def method_class(cfg) -> type[Method]:
    """The method a stage's TrainConfig runs."""
    if cfg.stage == "self_training" and cfg.teacher_momentum is not None:
        return HIAST
    try:
        return _BY_STAGE[cfg.stage]
    except KeyError:
        raise ValueError(f"unknown stage {cfg.stage!r}: choose one of {sorted(_BY_STAGE)}") from None


__all__ = ["HIAST", "IAST", "Adversarial", "Method", "Oracle", "STvM", "STvMConfig", "SourceOnly", "StepContext",
           "method_class", "uses_amp"]
