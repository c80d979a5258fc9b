"""The system service: who this replica is, and which replicas share the bus."""
