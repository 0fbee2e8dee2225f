"""The operator page: overview, jobs, a job, failures; retries for a signed-in operator."""

from service.face.ui.auth import Gate, TokenFile, parse_tokens
from service.face.ui.site import OperatorPage

__all__ = ["Gate", "OperatorPage", "TokenFile", "parse_tokens"]
