"""The release stage: registry, promotion and deploy gate, deploy targets, serving."""
