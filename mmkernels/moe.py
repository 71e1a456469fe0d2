"""Mixture-of-experts: routing (:func:`route`, :class:`Routing`) and the balancing losses.

``from mmkernels import moe``; ``moe.route(router_logits, top_k, ...)``.
"""
from mmkernels.ops.routing import Routing, route, suggest_block_m  # noqa: F401
from mmkernels.ops.routing import load_balancing_loss, router_z_loss, update_selection_bias  # noqa: F401
from mmkernels.ops.experts import dense_moe, experts  # noqa: F401

__all__ = ["Routing", "route", "suggest_block_m", "experts", "dense_moe", "load_balancing_loss", "router_z_loss", "update_selection_bias"]
