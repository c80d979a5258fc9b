"""The `fleetmate` command and its subcommands."""
