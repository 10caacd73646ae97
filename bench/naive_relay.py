#!/usr/bin/env python3
"""
The naive Twisted relay closewatch is measured against: one worker per
connection with C{spawnProcess}, bytes relayed both ways, C{SIGKILL} to the
worker (its pid only, not its group) in C{connectionLost}.  No close watch,
no flow control, no half-close.

    python bench/naive_relay.py PORT WORKER [ARG...]
"""

import sys

from twisted.internet import endpoints, error, protocol, reactor


class Worker(protocol.ProcessProtocol):
    def __init__(self, client):
        self.client = client

    def outReceived(self, data):
        self.client.transport.write(data)

    def processEnded(self, reason):
        self.client.transport.loseConnection()


class Relay(protocol.Protocol):
    def connectionMade(self):
        argv = sys.argv[2:]
        self.worker = reactor.spawnProcess(Worker(self), argv[0], argv, env=None)

    def dataReceived(self, data):
        self.worker.write(data)

    def connectionLost(self, reason):
        try:
            self.worker.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


endpoints.TCP4ServerEndpoint(reactor, int(sys.argv[1]), 1024, "127.0.0.1").listen(
    protocol.Factory.forProtocol(Relay)
)
reactor.run()
