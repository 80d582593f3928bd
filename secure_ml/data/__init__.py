"""The data stage: landing, ingest, schema and validation, poisoning screen, PII handling, split, DVC versions."""
