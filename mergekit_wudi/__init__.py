"""WUDI-Merging (arXiv 2503.08099) for mergekit: ``merge_method: wudi``.

Importing this package registers the method; installing it makes mergekit's
console scripts see it with no import at all (see ``registration``).
"""

from mergekit_wudi.registration import register

register()

__all__ = ["register"]
