"""Observability: the metric catalogue and Prometheus registries, the step logger, straggler detection, energy,
device peaks for MFU, the dashboard, plots."""
