"""Engine adaptors: one interface (base.py), one module per engine, found by name (registry.py)."""
