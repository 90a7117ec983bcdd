"""millimetric-bridge: verified provider webhooks in, Millimetric calls out, exactly once.

The public API, for handler plugins and for code that embeds the bridge.
"""

from bridge.client import (
    Accepted,
    AuthProblem,
    Invalid,
    MillimetricClient,
    Outcome,
    RateLimited,
    Retryable,
)
from bridge.errors import (
    BridgeError,
    ConfigError,
    EventInvalid,
    PayloadInvalid,
    SignatureInvalid,
    StoreUnavailable,
)
from bridge.events import Call, Forget, Identify, Track

__all__ = [
    "Accepted",
    "AuthProblem",
    "BridgeError",
    "Call",
    "ConfigError",
    "EventInvalid",
    "Forget",
    "Identify",
    "Invalid",
    "MillimetricClient",
    "Outcome",
    "PayloadInvalid",
    "RateLimited",
    "Retryable",
    "SignatureInvalid",
    "StoreUnavailable",
    "Track",
]
