"""Observability: metrics, the step logger, device peaks for MFU, plots."""
