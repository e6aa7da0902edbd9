"""Failures of the memory layer, each mapped to one HTTP status by the gateway."""

from __future__ import annotations


class MemoryFailure(Exception):
    """Base class; `code` is the OpenAI-shaped error code the gateway answers with."""

    status = 500
    code = "memory_error"


class KeyUnavailable(MemoryFailure):
    """The key-encryption key cannot be had: wrong passphrase or key file, PCRs changed,
    no TPM, missing keyring. Nothing is decrypted and nothing is written."""

    status = 503
    code = "memory_key_unavailable"


class Tampered(MemoryFailure):
    """A ciphertext or wrapped key failed authentication: modified, truncated, moved to
    another document or chunk, or sealed under another key. Never returned as data."""

    status = 500
    code = "memory_integrity_error"


class DocumentRejected(MemoryFailure):
    """The submitted document cannot be ingested: unsupported type, unparseable, empty."""

    status = 422
    code = "document_rejected"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EmbeddingUnavailable(MemoryFailure):
    """The embedding model is not loaded (digest mismatch, missing file) or its upstream
    does not answer."""

    status = 503
    code = "embedding_unavailable"


class StoreUnavailable(MemoryFailure):
    """The vector store cannot be opened or reached."""

    status = 503
    code = "vector_store_unavailable"
