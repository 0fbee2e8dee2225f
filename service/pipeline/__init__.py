"""The job pipeline: claim, check, import with retries, archive or set aside."""

from service.pipeline.events import Tally, Transition
from service.pipeline.wiring import Pipeline

__all__ = ["Pipeline", "Tally", "Transition"]
