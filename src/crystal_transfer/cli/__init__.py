"""Command line: argument parsing; each command calls one stage function."""
