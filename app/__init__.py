"""fleetmate: a control plane for fleets of databases."""

__version__ = "0.1.0"
