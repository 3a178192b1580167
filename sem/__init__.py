"""sem: Serving Engine Manager. This package is the `sem` command line; it imports both wings
(supervisor/, gateway/), which share only contract/ and never import it."""
