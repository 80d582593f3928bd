"""Who may do what: roles and clearances, approved sources, policy as code, notifications."""
