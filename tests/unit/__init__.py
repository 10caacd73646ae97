"""
The fast layer: in-memory tests of closewatch's logic (fake clock, fake
transports, fake workers).  No subprocess, no real socket, no sleeping, so
the whole package runs in seconds: C{python -m twisted.trial tests.unit}.
"""
