"""kazoo 2.11.0's own test suite run against fleetmate or a real ZooKeeper (see docs/compatibility-kazoo.md)."""

SERVER_ENV = "KAZOO_SUITE_SERVER"  # host:port of the ZooKeeper-protocol server under test
RESULTS_ENV = "KAZOO_SUITE_RESULTS"  # where the plugin writes the per-test outcomes as JSON
