"""Notifications: the events a job's transitions cause, the outbox's dispatcher, and one
module per channel kind behind the `Channel` protocol (`base.py`)."""

from service.notify.base import Channel, ChannelError, Event

__all__ = ["Channel", "ChannelError", "Event"]
