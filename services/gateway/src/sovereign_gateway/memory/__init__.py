"""The memory layer: RAM-only ingest, envelope-encrypted chunks, embeddings, vector search."""
