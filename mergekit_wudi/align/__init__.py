"""MuDSC alignment: permute a model's hidden units into a reference's order (exactly
function-preserving) so that models without a common base can be averaged.

``structure`` reads the permutation groups from a config, ``statistics`` the
activation correlations, ``matching`` finds the permutations, ``permute`` applies
them, ``cli`` is ``mergekit-wudi-align``.
"""
