"""submitd policy: decides every step of a submission session."""
