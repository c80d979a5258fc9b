"""The ZooKeeper wire protocol front end: existing ZooKeeper clients talk to the registry unchanged."""
