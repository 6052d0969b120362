"""User-facing tools around the compiler: datasets, the demo and the command line."""
