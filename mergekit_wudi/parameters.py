"""WUDI's parameters, and the checks that make a bad value's error name it.

mergekit checks parameter values while it plans the merge, before any tensor is
read. Each check here raises ``ParameterValueError`` with the parameter, the value
and what it must be; ``registration`` adds the model for per-model parameters, and
raises it to the user as a plain ``ValueError`` whose message is the whole story.
"""

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Optional, Type

from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from mergekit_wudi import solvers
from mergekit_wudi.tensor_rules import ApplyWudi, Layout


class Solver(str, Enum):
    ADAM = "adam"  # the paper's method (Algorithm 1)
    CLOSED_FORM = "closed_form"  # WUDI-CFS, Eq. 20
    SPECTRAL = "spectral"  # the gradient flow of Eq. 21 by eigendecomposition (OptMerge)


class Precision(str, Enum):
    """How the Adam solver's few accurate products are computed (``solvers.products``)."""

    AUTO = "auto"  # float64 matmuls where the device runs them fast
    FLOAT64 = "float64"  # float64 matmuls
    FLOAT32 = "float32"  # float32 matmuls on error-free splits, none in float64


# ``solvers.wudi_adam``'s ``float64_matmuls`` for each setting (None: ask the device).
FLOAT64_MATMULS = {Precision.AUTO: None, Precision.FLOAT64: True, Precision.FLOAT32: False}


class ParameterValueError(ValueError):
    """A bad value for one of WUDI's parameters, for the model ``model`` if per-model."""

    def __init__(self, parameter: str, requirement: str, model: Optional[str] = None):
        self.parameter, self.requirement, self.model = parameter, requirement, model
        of_model = f" of model {model}" if model is not None else ""
        super().__init__(f"wudi parameter {parameter!r}{of_model} {requirement}")

    def of_model(self, model: Any) -> "ParameterValueError":
        return ParameterValueError(self.parameter, self.requirement, str(model))


def _number(name: str, value: Any, infinity: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ParameterValueError(name, f"must be a number, got {value!r}")
    try:
        number = float(value)  # YAML reads 1e-5 as the string "1e-5"
    except ValueError:
        raise ParameterValueError(name, f"must be a number, got {value!r}") from None
    if math.isnan(number) or (math.isinf(number) and not infinity):
        kind = "a number or .inf" if infinity else "finite"
        raise ParameterValueError(name, f"must be {kind}, got {value!r}")
    return number


def _finite(name: str) -> Callable[[Any], float]:
    return lambda value: _number(name, value)


def _positive(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(name, value)
        if number <= 0:
            raise ParameterValueError(name, f"must be > 0, got {value!r}")
        return number

    return check


def _count(name: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _number(name, value)
        if number < 0 or number != int(number):
            raise ParameterValueError(name, f"must be a non-negative integer, got {value!r}")
        return int(number)

    return check


def _time(name: str) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(name, value, infinity=True)  # YAML's .inf: run to the limit
        if number < 0:
            raise ParameterValueError(name, f"must be >= 0, got {value!r}")
        return number

    return check


def _ratio_or_auto(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value == solvers.AUTOMATIC_RANK:
            return value
        try:
            number = _number(name, value)
        except ParameterValueError:
            number = math.nan
        if not 0 < number <= 1:
            raise ParameterValueError(
                name, f"must be a number in (0, 1] or {solvers.AUTOMATIC_RANK!r}, got {value!r}"
            )
        return number

    return check


def _choice(name: str, choices: Type[Enum]) -> Callable[[Any], Enum]:
    def check(value: Any) -> Enum:
        try:
            return choices(value)
        except ValueError:
            allowed = ", ".join(choice.value for choice in choices)
            raise ParameterValueError(name, f"must be one of {allowed}; got {value!r}") from None

    return check


@dataclass(frozen=True)
class WudiParameterSpec(ParameterSpec):
    """A mergekit parameter whose value is checked by ``check`` alone.

    mergekit's own ``validate`` runs a pydantic adapter, which would put its
    headline (``1 validation error for function-before[...]``) above our message.
    """

    check: Callable[[Any], Any] = None

    def validate(self, value: Any) -> Any:
        return self.check(value)


def _parameter(name: str, check: Callable[[Any], Any], default: Any, scope=ParameterScope.SHARED):
    return WudiParameterSpec(name=name, value_type=Any, scope=scope, default=default, check=check)


PARAMETERS = (
    _parameter("weight", _finite("weight"), 1.0, ParameterScope.NON_BASE),
    _parameter("lambda", _finite("lambda"), 1.0),
    _parameter("iterations", _count("iterations"), solvers.DEFAULT_ITERATIONS),
    _parameter("learning_rate", _positive("learning_rate"), solvers.DEFAULT_LEARNING_RATE),
    _parameter("solver", _choice("solver", Solver), Solver.ADAM),
    _parameter("omega", _positive("omega"), solvers.DEFAULT_OMEGA),
    _parameter("precision", _choice("precision", Precision), Precision.AUTO),
    _parameter("flow_time", _time("flow_time"), solvers.DEFAULT_FLOW_TIME),
    _parameter("rank_ratio", _ratio_or_auto("rank_ratio"), solvers.DEFAULT_RANK_RATIO),
    _parameter("rank_rule", _choice("rank_rule", solvers.RankRule),
               solvers.RankRule.PARTICIPATION_SQRT),
    _parameter("apply_wudi", _choice("apply_wudi", ApplyWudi), ApplyWudi.AUTO),
    _parameter("layout", _choice("layout", Layout), Layout.AUTO),
)
