"""The security stage: scans, SBOM, model signatures and SLSA attestations."""
