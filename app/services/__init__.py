"""fleetmate's services, one package each: messages, pure state machine, bus handlers, errors."""
