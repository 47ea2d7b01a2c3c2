"""gpumarket's sans-I/O protocol core.

Nothing in this package performs I/O or reads a clock or a global RNG: callers pass the current
time (integer unix milliseconds) and a `random.Random`. The node (libp2p, SQLite, web3) and the
simulator (virtual clock) drive the same code. `tests/test_sans_io.py` keeps it that way.
"""
