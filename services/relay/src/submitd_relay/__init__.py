"""submitd relay: delivers queued messages to the next hop."""
