"""Command-line entry points: argument parsing only; each command calls one API function."""
