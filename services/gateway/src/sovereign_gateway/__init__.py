"""The SovereignStack gateway: an OpenAI-compatible API behind OIDC, policy, lock and audit."""

__version__ = "0.1.0"
