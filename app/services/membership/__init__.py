"""Membership: nodes heartbeat; the leader derives online / suspect / down and records each change in the registry."""
