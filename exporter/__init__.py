"""Prometheus exporter for SignalWire message logs."""

__version__ = "0.1.0"
