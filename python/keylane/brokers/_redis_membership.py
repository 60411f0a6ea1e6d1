"""Who owns which stream: the membership and lease protocol of keylane's
Redis Streams consumer groups.

Redis consumer groups hand any entry of a stream to any consumer, which
would run one key in two places. keylane therefore gives each stream (a
topic-partition) one owner at a time:

- Members renew ``{prefix}group:{g}:members`` (a sorted set: member -> lease
  end, ms) every third of ``lease_ms``; a member whose lease ended is
  dropped by whoever looks next.
- Each member notes the topics it consumes (``subscriptions``, a hash).
  The target assignment is computed alike by every member: each topic's
  partitions in order, round robin over the live members (sorted) that
  consume it.
- A member owns partition p while it holds ``owner:{topic}:{p}`` (SET NX PX
  lease, renewed with the membership). A partition that leaves its target
  is reported revoked; the runtime drains and commits it, then ``release``
  deletes the lock and leaves a ``freed`` marker. A partition whose owner
  died is free once its lock expires.
- A new owner first claims the stream's pending entries (XAUTOCLAIM) in id
  order and hands them out before any new entry: with no minimum idle time
  after a release (the old owner committed and stopped), with ``lease_ms``
  after a death (an entry the dead owner read within its last lease is left
  until that long has passed). Until no pending entry belongs to another
  consumer, nothing of the stream is handed out.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import redis

from keylane.brokers._redis_common import Keys, Options
from keylane.brokers.base import TopicPartition

# KEYS: owner locks; ARGV: member, lease ms. Renews the locks still held by
# the member; returns 1/0 per lock.
RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: owner lock, freed marker; ARGV: member, marker lifetime ms.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


@dataclasses.dataclass
class Tick:
    """What one look at the group found."""

    counts: dict[str, int]
    claimed: dict[TopicPartition, int]  # partition -> min idle ms for its claim
    to_revoke: set[TopicPartition]
    lost: set[TopicPartition]
    settled: bool


class Membership:
    def __init__(
        self, client: redis.Redis, keys: Keys, o: Options, group: str, member: str
    ) -> None:
        self.r = client
        self.keys = keys
        self.o = o
        self.group = group
        self.member = member
        self.renew = client.register_script(RENEW)
        self.release_script = client.register_script(RELEASE)

    def tick(
        self, topics: Sequence[str], owned: set[TopicPartition], revoking: set[TopicPartition]
    ) -> Tick:
        """Renews this member and its locks, and claims what the target gives it."""
        k, lease = self.keys, self.o.lease_ms
        now = int(time.time() * 1000)
        p = self.r.pipeline(transaction=False)
        for t in topics:
            p.get(k.partitions(t))
        p.zadd(k.members(self.group), {self.member: now + lease})
        p.zremrangebyscore(k.members(self.group), "-inf", now)
        p.hset(k.subscriptions(self.group), self.member, "\n".join(topics))
        p.zrange(k.members(self.group), 0, -1)
        p.hgetall(k.subscriptions(self.group))
        replies: list[Any] = p.execute()
        counts = {t: int(c) for t, c in zip(topics, replies[: len(topics)], strict=True) if c}
        live = sorted(m.decode() for m in replies[-2])
        subs = {m.decode(): set(v.decode().split("\n")) for m, v in replies[-1].items()}
        gone = [m for m in subs if m not in live]
        if gone:
            self.r.hdel(k.subscriptions(self.group), *gone)
        every = sorted(TopicPartition(t, i) for t, n in counts.items() for i in range(n))
        target: dict[TopicPartition, str] = {}
        for t, n in sorted(counts.items()):
            eligible = [m for m in live if t in subs.get(m, ())]
            for i in range(n):
                if eligible:
                    target[TopicPartition(t, i)] = eligible[i % len(eligible)]
        held = sorted(owned)
        lost: set[TopicPartition] = set()
        if held:
            kept = self.renew(
                keys=[k.owner(self.group, *tp) for tp in held], args=[self.member, lease]
            )
            lost = {tp for tp, ok in zip(held, kept, strict=True) if not ok}
        mine = {tp for tp, m in target.items() if m == self.member}
        to_revoke = (owned - lost) - mine - revoking
        claimed: dict[TopicPartition, int] = {}
        for tp in sorted(mine - owned):
            if self.r.set(k.owner(self.group, *tp), self.member, nx=True, px=lease):
                freed = self.r.getdel(k.freed(self.group, *tp))
                claimed[tp] = 0 if freed is not None else lease
        settled = False
        if every:
            holders: list[Any] = self.r.mget([k.owner(self.group, *tp) for tp in every])
            settled = all(
                h is not None and h.decode() == target.get(tp)
                for tp, h in zip(every, holders, strict=True)
            )
        return Tick(counts, claimed, to_revoke, lost, settled)

    def release(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self.release_script(
                keys=[self.keys.owner(self.group, *tp), self.keys.freed(self.group, *tp)],
                args=[self.member, 2 * self.o.lease_ms],
            )

    def leave(self, tps: Sequence[TopicPartition]) -> None:
        self.release(tps)
        self.r.zrem(self.keys.members(self.group), self.member)
        self.r.hdel(self.keys.subscriptions(self.group), self.member)
