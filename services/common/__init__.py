"""The runtime every coldstart service shares: settings, server bootstrap, logs,
metrics, errors, Kafka and model-registry helpers."""
