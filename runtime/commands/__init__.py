"""Subcommands of `mu0`, one module each."""
