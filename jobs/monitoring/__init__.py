"""What watches the night: checks and thresholds, input and feature drift, the publish gate, run history,
freshness and alerts. Never imports a step."""
