"""Subcommands of the `aftermath` CLI, one module each (see aftermath.cli)."""
