"""Signed, content-addressed air-gap bundles: create, verify, split and join, import."""
