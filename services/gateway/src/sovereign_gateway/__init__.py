"""The SovereignStack gateway: an OpenAI-compatible API behind OIDC, policy, lock and audit."""
