"""Mirrors that fetch what an air-gapped node needs, over plain HTTP with `requests`.

Each mirror (pypi, oci, debian, models) downloads into a directory of its own and
returns the `Artifact`s it holds, which the bundle signs and lists in its SBOM.
"""
