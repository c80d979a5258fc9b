"""Test helpers: real servers on free ports in temporary directories, and waiting on conditions.

- `fleetmate`: nats-server and fleetmate processes (`NatsServer`, `Fleetmate`, `ReplicaSet`),
  `free_port`, `run_cli`, `running`
- `wait`: `wait_for` and its async twin `eventually`, polling a condition with a deadline
- `natscluster`: a 3-server NATS cluster with JetStream
- `servers`: MariaDB, PostgreSQL 15 and SeaweedFS S3 servers
- `mariadb`, `postgres`: replica sets of those engines for the HA tests
- `agent`: `fleetmate agent` as a subprocess
- `datanode`: the scheduler's test data node program, `DataNode` and `DataNodes` (its processes)
- `netns`: a network namespace and ways to cut links out of it
- `zkwire`: a raw ZooKeeper wire client
- `tlscerts`: a CA and certificates made with openssl
- `history`: the write/watch history recorded by the kill tests, and its checks

The names most tests use are importable from `tests.harness` itself.
"""

from tests.harness.fleetmate import ROOT, Fleetmate, NatsServer, ReplicaSet, free_port, run_cli, running
from tests.harness.wait import eventually, wait_for

__all__ = ["ROOT", "Fleetmate", "NatsServer", "ReplicaSet", "eventually", "free_port", "run_cli", "running", "wait_for"]
