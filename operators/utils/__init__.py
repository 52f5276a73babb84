"""What the operators share: job folders, spec overrides, parent models, outcomes, the encryption key."""
