"""Floor probe: about the leanest single-threaded TCP forwarder CPython can be.

Raw non-blocking sockets, one epoll, no asyncio, no transports, no tasks, no features
(no timeouts, no failover, no logging; its bulk path is naive). It exists to measure what
a Python data path costs per short connection and per idle session, so that tcpfwd's
figures can be read against a measured floor in the same benchmark run. Not product code.

usage: python floor_proxy.py LPORT HOST:PORT      (listens on 127.0.0.1:LPORT)
"""

import errno
import select
import socket
import sys

IN, OUT, HUP, ERR = (
    select.EPOLLIN,
    select.EPOLLOUT,
    select.EPOLLRDHUP | select.EPOLLHUP,
    select.EPOLLERR,
)
BUF = 65536


class Side:
    __slots__ = ("eof_in", "fd", "peer", "pending", "shut_out", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = None
        self.pending = b""  # bytes read from the peer not yet written to this side
        self.eof_in = False  # this side sent FIN
        self.shut_out = False  # we sent FIN to this side


def main():
    lport = int(sys.argv[1])
    host, port = sys.argv[2].rsplit(":", 1)
    target = (host, int(port))
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", lport))
    ls.listen(4096)
    ls.setblocking(False)
    ep = select.epoll()
    lfd = ls.fileno()
    ep.register(lfd, IN)
    sides = {}
    connecting = {}

    def close_pair(s):
        for x in (s, s.peer):
            if x is not None and x.fd in sides:
                del sides[x.fd]
                x.sock.close()

    def pump(src):
        dst = src.peer
        if dst.pending:
            return
        try:
            data = src.sock.recv(BUF)
        except BlockingIOError:
            return
        except OSError:
            close_pair(src)
            return
        if data:
            try:
                n = dst.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                close_pair(src)
                return
            if n < len(data):
                dst.pending = data[n:]
                ep.modify(src.fd, 0)
                ep.modify(dst.fd, IN | OUT)
            return
        src.eof_in = True
        ep.modify(src.fd, 0)
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            # The peer is already gone (a reset): without this the probe itself would die.
            close_pair(src)
            return
        dst.shut_out = True
        if dst.eof_in:
            close_pair(src)

    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                for _ in range(64):
                    try:
                        cfd, _addr = ls._accept()
                    except BlockingIOError:
                        break
                    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, cfd)
                    c.setblocking(False)
                    b = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    e = b.connect_ex(target)
                    if e not in (0, errno.EINPROGRESS):
                        b.close()
                        c.close()
                        continue
                    cs, bs = Side(c), Side(b)
                    cs.peer, bs.peer = bs, cs
                    connecting[bs.fd] = bs
                    ep.register(bs.fd, OUT)
                continue
            bs = connecting.pop(fd, None)
            if bs is not None:
                if ev & (ERR | select.EPOLLHUP):
                    bs.sock.close()
                    bs.peer.sock.close()
                    continue
                sides[bs.fd] = bs
                cs = bs.peer
                sides[cs.fd] = cs
                ep.modify(bs.fd, IN)
                ep.register(cs.fd, IN)
                continue
            s = sides.get(fd)
            if s is None:
                continue
            if ev & OUT and s.pending:
                try:
                    n = s.sock.send(s.pending)
                except BlockingIOError:
                    n = 0
                except OSError:
                    close_pair(s)
                    continue
                s.pending = s.pending[n:]
                if not s.pending:
                    ep.modify(s.fd, 0 if s.eof_in else IN)
                    if not s.peer.eof_in:
                        ep.modify(s.peer.fd, IN)
            if ev & (IN | ERR | select.EPOLLHUP) and not s.eof_in:
                pump(s)


if __name__ == "__main__":
    main()
