"""Type stubs for keylane's Rust extension (checked against it by stubtest)."""

from collections.abc import Iterable
from typing import TypeAlias

_Key: TypeAlias = bytes | bytearray | memoryview | str

__all__ = [
    "__version__",
    "murmur2",
    "partition_for_key",
    "partitions_for_keys",
    "repartition_moves",
]

__version__: str

def murmur2(data: _Key) -> int: ...
def partition_for_key(key: _Key, num_partitions: int) -> int: ...
def partitions_for_keys(keys: Iterable[_Key], num_partitions: int) -> list[int]: ...
def repartition_moves(keys: Iterable[_Key], old_partitions: int, new_partitions: int) -> float: ...
