"""Training: chunked loss, AdamW with schedules and frozen groups, the jitted sharded train step."""
