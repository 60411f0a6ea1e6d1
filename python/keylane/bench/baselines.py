"""Pure-Python baselines that the native code is measured (and tested) against.

These are deliberately the straightforward versions a team would write or
copy before reaching for keylane; they are correct, not tuned.
"""

from __future__ import annotations

_MASK = 0xFFFFFFFF
_SEED = 0x9747B28C
_M = 0x5BD1E995


def murmur2_py(data: bytes) -> int:
    """Kafka's murmur2 in plain Python, returning the Java ``int`` value."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length & ~3
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key_py(key: bytes, num_partitions: int) -> int:
    """The Java producer's partition for a non-null key, in plain Python."""
    return (murmur2_py(key) & 0x7FFFFFFF) % num_partitions
