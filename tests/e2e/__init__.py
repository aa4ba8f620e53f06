"""Tests on real sockets: real ``tcpfwd`` processes, in-process data planes, peers
(HAProxy, nginx, Postfix, aiosmtpd, Prometheus, Chromium) and network namespaces."""
