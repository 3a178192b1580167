"""sem: Serving Engine Manager. This package holds the CLI and the leaf types both wings share."""
