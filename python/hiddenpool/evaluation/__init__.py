"""Ranking strategies: sentence similarity (``evaluate``), retrieval (``retrieval``),
bootstrap intervals and paired tests (``bootstrap``), and the report's tables and charts
(``report``)."""
