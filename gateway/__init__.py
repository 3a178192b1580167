"""sem gateway: the front door. Routes requests to engines by model; never starts processes."""
