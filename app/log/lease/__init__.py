"""Leader leases: one interface, one module per backend, chosen by `lease.backend`."""
