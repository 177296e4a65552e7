"""Per-head sparse-attention plans: the versioned JSON schema (:mod:`longinfer.plans.schema`)."""

from longinfer.plans.schema import (
    DEFAULT_DENSE_BELOW,
    DEFAULT_DENSE_LAST,
    DEFAULT_LONG_FROM,
    DEFAULT_QUESTION_FROM,
    DEFAULT_PATTERN_CONFIG,
    SCHEMA_VERSION,
    HeadPlan,
    LayerPlan,
    ModelShape,
    Plan,
    default_plan_for,
    model_shape,
    uniform_plan,
)

__all__ = [
    "DEFAULT_DENSE_BELOW",
    "DEFAULT_DENSE_LAST",
    "DEFAULT_LONG_FROM",
    "DEFAULT_QUESTION_FROM",
    "DEFAULT_PATTERN_CONFIG",
    "SCHEMA_VERSION",
    "HeadPlan",
    "LayerPlan",
    "ModelShape",
    "Plan",
    "default_plan_for",
    "model_shape",
    "uniform_plan",
]
