"""The AI runtime behind the gateway: model registry, router, and the engines it drives."""
