"""The Kafka-compatible partitioner, through the binding."""

from __future__ import annotations

import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

import keylane
from keylane.bench.baselines import murmur2_py, partition_for_key_py

# apache/kafka clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java, testMurmur2.
KAFKA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]

# confluentinc/librdkafka src/rdmurmur2.c, unittest_murmur2 (unsigned hex as printed there).
_SHORT = b"1234"
_LONG = b"PreAmbleWillBeRemoved,ThePrePartThatIs"
LIBRDKAFKA_VECTORS = [
    (b"kafka", 0xD067CF64),
    (b"giberish123456789", 0x8F552B0C),
    (_SHORT, 0x9FC97B14),
    (_SHORT[1:], 0xE7C009CA),
    (_SHORT[2:], 0x873930DA),
    (_SHORT[3:], 0x5A4B5CA1),
    (_LONG, 0x78424F1C),
    (_LONG[1:], 0x4A62B377),
    (_LONG[2:], 0xE0E4E09E),
    (_LONG[3:], 0x62B8B43F),
    (b"", 0x106E08D9),
]

# kafka-python test/test_partitioner.py: partitions of a 1000-partition topic.
KAFKA_PYTHON_PARTITIONS = [
    (b"", 681),
    (b"a", 524),
    (b"ab", 434),
    (b"abc", 107),
    (b"123456789", 566),
    (b"\x00 ", 742),
]


def _signed(u: int) -> int:
    return u - (1 << 32) if u & 0x80000000 else u


@pytest.mark.parametrize(("key", "expected"), KAFKA_VECTORS)
def test_kafka_vectors(key: bytes, expected: int) -> None:
    assert keylane.murmur2(key) == expected


@pytest.mark.parametrize(("key", "expected"), LIBRDKAFKA_VECTORS)
def test_librdkafka_vectors(key: bytes, expected: int) -> None:
    assert keylane.murmur2(key) == _signed(expected)


@pytest.mark.parametrize(("key", "expected"), KAFKA_PYTHON_PARTITIONS)
def test_kafka_python_partitions(key: bytes, expected: int) -> None:
    assert keylane.partition_for_key(key, 1000) == expected
    assert keylane.partitions_for_keys([key], 1000) == [expected]


def test_reference_matches_published_vectors() -> None:
    # The pure-Python reference is only useful if it is itself right.
    for key, expected in KAFKA_VECTORS:
        assert murmur2_py(key) == expected
    for key, expected in LIBRDKAFKA_VECTORS:
        assert murmur2_py(key) == _signed(expected)


@given(data=st.binary(min_size=0, max_size=1000), n=st.integers(1, 10_000))
def test_native_equals_reference(data: bytes, n: int) -> None:
    assert keylane.murmur2(data) == murmur2_py(data)
    assert keylane.partition_for_key(data, n) == partition_for_key_py(data, n)


@given(text=st.text(max_size=200), n=st.integers(1, 10_000))
def test_str_keys_hash_as_utf8(text: str, n: int) -> None:
    raw = text.encode("utf-8")
    assert keylane.murmur2(text) == keylane.murmur2(raw)
    assert keylane.partition_for_key(text, n) == keylane.partition_for_key(raw, n)


@given(
    keys=st.lists(st.binary(max_size=64) | st.text(max_size=16), max_size=300),
    n=st.integers(1, 10_000),
)
def test_batch_equals_one_by_one(keys: list[bytes | str], n: int) -> None:
    assert keylane.partitions_for_keys(keys, n) == [keylane.partition_for_key(k, n) for k in keys]


def test_batch_spanning_many_chunks() -> None:
    # More keys and bytes than one native chunk, so the chunk seams are crossed.
    keys = [f"k{i}".encode() * (1 + i % 50) for i in range(30_000)]
    assert keylane.partitions_for_keys(keys, 97) == [partition_for_key_py(k, 97) for k in keys]


def test_batch_accepts_any_iterable() -> None:
    gen = (f"acct-{i}" for i in range(10))
    expected = [keylane.partition_for_key(f"acct-{i}", 6) for i in range(10)]
    assert keylane.partitions_for_keys(gen, 6) == expected
    assert keylane.partitions_for_keys((), 6) == []


def test_bytes_like_keys_hash_their_bytes() -> None:
    raw = b"account-42"
    assert keylane.murmur2(bytearray(raw)) == keylane.murmur2(raw)
    assert keylane.murmur2(memoryview(raw)) == keylane.murmur2(raw)
    assert keylane.murmur2(memoryview(raw)[2:5]) == keylane.murmur2(raw[2:5])
    ints = array.array("i", [1, 2, 3])
    assert keylane.murmur2(memoryview(ints)) == keylane.murmur2(ints.tobytes())


def test_big_key_releases_gil_and_still_matches() -> None:
    key = bytes(range(256)) * 1024  # 256 KiB: takes the GIL-released path
    assert keylane.murmur2(key) == murmur2_py(key)
    assert keylane.partition_for_key(key, 12) == partition_for_key_py(key, 12)


def test_repartition_moves_six_to_twelve() -> None:
    keys = [f"acct-{i}" for i in range(20_000)]
    expected = sum(
        partition_for_key_py(k.encode(), 6) != partition_for_key_py(k.encode(), 12) for k in keys
    ) / len(keys)
    got = keylane.repartition_moves(keys, 6, 12)
    assert got == pytest.approx(expected)
    assert 0.45 < got < 0.55
    assert keylane.repartition_moves(keys, 12, 12) == 0.0


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, 42, 4.2, ["a"], {"a": 1}, object()])
def test_bad_key_types_raise_type_error_naming_the_type(bad: object) -> None:
    with pytest.raises(keylane.InvalidType, match=type(bad).__name__) as info:
        keylane.murmur2(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, keylane.KeylaneError)
    with pytest.raises(TypeError, match=type(bad).__name__):
        keylane.partition_for_key(bad, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=type(bad).__name__):
        keylane.partitions_for_keys([b"ok", bad], 3)  # type: ignore[list-item]


def test_non_contiguous_memoryview_is_refused() -> None:
    view = memoryview(b"abcdefgh")[::2]
    with pytest.raises(TypeError, match="contiguous"):
        keylane.murmur2(view)


def test_str_that_cannot_be_utf8_is_a_value_error() -> None:
    with pytest.raises(keylane.InvalidArgument, match="UTF-8"):
        keylane.murmur2("bad \udc80 surrogate")


@pytest.mark.parametrize("n", [0, -1, 2**31, 2**70])
def test_partition_count_out_of_range(n: int) -> None:
    with pytest.raises(keylane.InvalidArgument, match="num_partitions"):
        keylane.partition_for_key(b"k", n)
    with pytest.raises(ValueError, match="num_partitions"):
        keylane.partitions_for_keys([b"k"], n)


@pytest.mark.parametrize("n", [True, 1.5, "3", None])
def test_partition_count_wrong_type(n: object) -> None:
    with pytest.raises(keylane.InvalidType, match="num_partitions must be an int"):
        keylane.partition_for_key(b"k", n)  # type: ignore[arg-type]


def test_partition_count_accepts_index_objects() -> None:
    class Twelve:
        def __index__(self) -> int:
            return 12

    assert keylane.partition_for_key(b"k", Twelve()) == keylane.partition_for_key(b"k", 12)  # type: ignore[arg-type]


def test_not_iterable_keys() -> None:
    with pytest.raises(TypeError):
        keylane.partitions_for_keys(42, 3)  # type: ignore[arg-type]


def test_iterator_errors_propagate() -> None:
    def keys():  # type: ignore[no-untyped-def]
        yield b"a"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        keylane.partitions_for_keys(keys(), 3)


def test_repartition_moves_bad_input() -> None:
    with pytest.raises(keylane.InvalidArgument, match="at least one key"):
        keylane.repartition_moves([], 6, 12)
    with pytest.raises(keylane.InvalidArgument, match="old_partitions"):
        keylane.repartition_moves(["a"], 0, 12)
    with pytest.raises(keylane.InvalidArgument, match="new_partitions"):
        keylane.repartition_moves(["a"], 6, -2)
    with pytest.raises(TypeError, match="NoneType"):
        keylane.repartition_moves(["a", None], 6, 12)  # type: ignore[list-item]
