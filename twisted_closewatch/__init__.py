"""
closewatch: a worker process per connection, killed the moment the client
is gone.
"""

__version__ = "0.1.0"
