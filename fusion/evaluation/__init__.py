"""Evaluation: the published fusion metrics, scoring fused images, the evaluate stage
(metric names: ``fusion.metric_names``)."""
