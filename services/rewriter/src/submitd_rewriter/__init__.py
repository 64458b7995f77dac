"""submitd rewriter: completes, rewrites and signs messages."""
