"""What every service shares: config, the streaming runtime, DLQ, metrics, topics, the broker."""
