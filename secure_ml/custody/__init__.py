"""The chain of custody: digests and atomic writes, authenticated encryption, keys, the artifact store, the audit log."""
