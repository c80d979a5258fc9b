"""HA: discovery, failure analysis and recovery of MySQL/MariaDB and PostgreSQL replication topologies."""
