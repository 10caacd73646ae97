"""
closewatch: a worker process per connection, killed the moment the client
is gone.
"""
