"""Making ``merge_method: wudi`` known to mergekit, which has no plugin entry points.

``register`` is idempotent and runs on ``import mergekit_wudi``. For mergekit's
console scripts the startup hook ``_mergekit_wudi_startup`` (installed with a
``.pth`` file) calls it as soon as mergekit's registry or parameter resolver loads.
It also wraps mergekit's ``resolve_parameters`` for WUDI: unknown parameter names
are an error, and a bad value's error names the model it belongs to.
"""

import sys
from types import ModuleType
from typing import Any, Callable, Iterable

from mergekit.merge_methods.base import ParameterScope

from mergekit_wudi.method import METHOD_NAME, wudi_merge
from mergekit_wudi.parameters import ParameterValueError


def _register_method(registry: ModuleType) -> None:
    registered = {method.spec.name: method for method in registry.registered_methods()}
    if METHOD_NAME not in registered:
        registry.register(wudi_merge)
    elif registered[METHOD_NAME] is not wudi_merge:
        raise RuntimeError(
            f"another merge method is already registered as {METHOD_NAME!r}: "
            f"{registered[METHOD_NAME]!r}"
        )


def check_parameter_names(spec: Any, settings: Iterable[Any]) -> None:
    """mergekit ignores parameter names no method declares; for WUDI a typo
    (``iteration: 50``) would silently run the defaults, so it is an error."""
    known = {parameter.name for parameter in spec.parameters}
    unknown = sorted({name for scope in settings if scope for name in scope} - known)
    if unknown:
        raise TypeError(
            f"Unknown parameter(s) for {spec.name}: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(known))})"
        )


def _checking_names(resolve_parameters: Callable[..., Any]) -> Callable[..., Any]:
    def resolve_parameters_checked(spec, *, inputs, sources, **kwargs):
        if spec.name != METHOD_NAME:
            return resolve_parameters(spec, inputs=inputs, sources=sources, **kwargs)
        check_parameter_names(
            spec, [*sources(None), *(s for model in inputs for s in sources(model))]
        )
        try:
            return resolve_parameters(spec, inputs=inputs, sources=sources, **kwargs)
        except ParameterValueError as error:
            named = _naming_the_model(error, resolve_parameters, spec, inputs, sources, kwargs)
        # A plain ValueError, raised here: the last line of the traceback is the message.
        raise ValueError(str(named)) from None

    resolve_parameters_checked.checks_wudi_names = True
    return resolve_parameters_checked


def _naming_the_model(error, resolve_parameters, spec, inputs, sources, kwargs):
    """mergekit validates per-model values without saying whose they are; resolve
    one model at a time to find the model whose value ``error`` is about."""
    scopes = {parameter.name: parameter.scope for parameter in spec.parameters}
    if scopes.get(error.parameter) == ParameterScope.SHARED:
        return error
    for model, input_name in inputs.items():
        try:
            resolve_parameters(spec, inputs={model: input_name}, sources=sources, **kwargs)
        except ParameterValueError as per_model:
            return per_model.of_model(model)
    return error


def _guard_parameter_names(resolver: ModuleType) -> None:
    original = resolver.resolve_parameters
    if getattr(original, "checks_wudi_names", False):
        return
    resolver.resolve_parameters = _checking_names(original)
    # Modules that imported the function before this ran hold the original.
    for module_name in ("mergekit.plan", "mergekit.scripts.merge_raw_pytorch"):
        module = sys.modules.get(module_name)
        if getattr(module, "resolve_parameters", None) is original:
            module.resolve_parameters = resolver.resolve_parameters


def register() -> None:
    """Register WUDI with mergekit and check its parameter names (idempotent)."""
    from mergekit.merge_methods import registry

    _register_method(registry)
    resolver = sys.modules.get("mergekit.parameter_resolver")
    if resolver is None:
        from mergekit import parameter_resolver as resolver
    if hasattr(resolver, "resolve_parameters"):
        _guard_parameter_names(resolver)
    # else: it is mid-import; the startup hook calls register() once it has loaded.
