"""Ranking strategies: sentence similarity (``evaluate``), retrieval (``retrieval``),
bootstrap intervals and paired tests (``bootstrap``), the report's tables and charts
(``report``), the learned layer mix (``layer_mix``: ``fit_layer_mix``) and the precision
tiers (``tiers``)."""

from hiddenpool.evaluation.layer_mix import LayerMixFit, fit_layer_mix

__all__ = ["LayerMixFit", "fit_layer_mix"]
