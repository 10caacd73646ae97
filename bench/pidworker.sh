#!/bin/sh
# Benchmark worker: print our PID, then block without ever reading stdin or
# noticing the client.  `exec` keeps the PID: the process the server must
# kill is exactly the one whose PID the client received.
echo $$
exec sleep 1000000
