"""Threshold tuning: labelled series (``generate``/``export``), replay
through the Rust engine with metrics (``evaluate``), a multi-objective
search over the thresholds (``search``), the effect of a threshold change
on the live store (``impact``) and the tables and HTML report for all of
them (``report``)."""
