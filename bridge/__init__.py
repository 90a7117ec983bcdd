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
    ProviderError,
    SignatureInvalid,
    StoreUnavailable,
)
from bridge.events import About, Alias, Call, Forget, ForgetVisitor, Identify, Output, Purge, Track

__all__ = [
    "About",
    "Accepted",
    "Alias",
    "AuthProblem",
    "BridgeError",
    "Call",
    "ConfigError",
    "EventInvalid",
    "Forget",
    "ForgetVisitor",
    "Identify",
    "Invalid",
    "MillimetricClient",
    "Outcome",
    "Output",
    "PayloadInvalid",
    "ProviderError",
    "Purge",
    "RateLimited",
    "Retryable",
    "SignatureInvalid",
    "StoreUnavailable",
    "Track",
]
