"""Optimal transport for UNITER's word-region alignment (WRA): batched IPOT with reference, C++ and Triton backends.

``optimal_transport_dist`` is the drop-in for the original ``model/ot.py`` function; ``ipot`` returns the plan.
"""

from uniter_fast.ot.api import cost_matrix_cosine, ipot, optimal_transport_dist
from uniter_fast.ot.backends import available_backends
from uniter_fast.ot.checks import MIN_BETA

__all__ = ["MIN_BETA", "available_backends", "cost_matrix_cosine", "ipot", "optimal_transport_dist"]
