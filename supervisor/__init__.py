"""sem supervisor: caches models, places replicas, runs and watches vLLM engines, admin API."""
