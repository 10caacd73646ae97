"""
The twistd plugin: C{twistd closewatch}.  Only a L{ServiceMaker}, so that
scanning plugins imports nothing of closewatch itself.
"""

from twisted.application.service import ServiceMaker

closewatch = ServiceMaker(
    "closewatch",
    "twisted_closewatch.tap",
    "A worker process per connection, killed the moment its client is gone.",
    "closewatch",
)
