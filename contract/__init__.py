"""What both daemons and the CLI agree on: a leaf package that imports neither wing."""
