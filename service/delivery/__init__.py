"""Delivery sinks: one module per kind behind the `Sink` protocol (`base.py`)."""

from service.delivery.base import Item, Receipt, Sink, SinkError

__all__ = ["Item", "Receipt", "Sink", "SinkError"]
