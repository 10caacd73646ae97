"""
A Python worker module that cannot be imported (for the spawner's tests).
"""

raise ImportError("this module is broken on purpose")
