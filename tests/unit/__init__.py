"""Tests that open no sockets and start no tcpfwd: parsers, codecs, policy, state machines,
and the shipped files (docs, deploy, alert rules, the code itself)."""
