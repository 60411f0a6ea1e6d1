"""``keylane lab``: the ways per-key order breaks in production, reproduced
on the real runtime and broker code paths, with each defence off and on.

One module per scenario; each has ``NAME``, ``DESCRIPTION`` and
``run(opts) -> list[Row]``. See docs/lab.md.
"""
