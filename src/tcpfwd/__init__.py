"""tcpfwd: a TCP bouncer with ordered, per-connection failover."""

__version__ = "0.1.0"
