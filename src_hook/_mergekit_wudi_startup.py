"""Startup hook for mergekit-wudi, run from ``mergekit_wudi.pth`` (standard library only).

It imports nothing heavy at interpreter start: it only asks to be told when
mergekit's method registry or parameter resolver has been imported, and then lets
``mergekit_wudi.registration.register`` make ``merge_method: wudi`` known. If
that fails (a broken install), mergekit still works for every other method.
"""

import importlib.machinery
import sys

_WATCHED = ("mergekit.merge_methods.registry", "mergekit.parameter_resolver")


def _register_wudi():
    """Register wudi; any failure is one warning on stderr, never mergekit's: a
    plugin must not break its host, whose other methods keep working."""
    global _warned
    try:
        registration = sys.modules.get("mergekit_wudi.registration")
        if registration is not None and hasattr(registration, "register"):
            registration.register()
        elif "mergekit_wudi" not in sys.modules:
            try:
                import mergekit_wudi  # noqa: F401  (registers on import)
            except ModuleNotFoundError as error:
                if error.name != "mergekit_wudi":
                    raise
                # The package was removed but this file was left behind: stay silent.
        # Otherwise mergekit_wudi is mid-import and registers itself when it finishes.
    except Exception as error:  # noqa: BLE001  (whatever it is, mergekit must go on)
        if not _warned:
            _warned = True
            sys.stderr.write(
                f"WARNING: mergekit-wudi: merge_method 'wudi' is unavailable"
                f" ({type(error).__name__}: {error}); mergekit's other merge methods work."
                " Reinstall mergekit-wudi to fix it"
                " (pip install --force-reinstall mergekit-wudi).\n"
            )


_warned = False


class _AfterMergekitImport:
    """A meta path finder for mergekit's two modules; all others pass by."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader_exec = spec.loader.exec_module

        def exec_module(module):
            loader_exec(module)
            _register_wudi()

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, _AfterMergekitImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterMergekitImport())
