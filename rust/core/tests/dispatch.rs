//! Dispatcher behaviour (the suite is a macro so that a design under
//! comparison can be held to it too).

use std::collections::{HashMap, HashSet};

use keylane_core::Error;
use keylane_core::dispatch::{
    Config, Dispatch, Dispatcher, Ordering, Prepared, ReceiptInfo, Retried, Ticket,
};

type Item = (Option<String>, i32, i64);

fn make<D: Dispatch<Item>>(ordering: Ordering, capacity: usize, max_in_flight: usize) -> D {
    D::new(Config { ordering, capacity, max_in_flight, seed: None }).unwrap()
}

fn prep<D: Dispatch<Item>>(d: &D, key: Option<&str>, partition: i32, offset: i64) -> Prepared<Item> {
    Prepared {
        lane: d.lane_of(key.map(str::as_bytes), partition),
        partition,
        offset,
        item: (key.map(str::to_owned), partition, offset),
    }
}

fn push<D: Dispatch<Item>>(d: &D, key: Option<&str>, partition: i32, offset: i64) {
    d.push(prep(d, key, partition, offset)).unwrap();
}

fn pop<D: Dispatch<Item>>(d: &D, n: usize) -> Vec<Ticket<Item, D::Receipt>> {
    let popped = d.pop_ready(n);
    assert!(popped.discarded.is_empty());
    popped.tickets
}

fn sorted<R>(ts: &[Ticket<Item, R>]) -> Vec<(i32, i64)> {
    let mut v: Vec<_> = ts.iter().map(|t| (t.item.1, t.item.2)).collect();
    v.sort_unstable();
    v
}

fn offsets<R>(ts: &[Ticket<Item, R>]) -> Vec<i64> {
    ts.iter().map(|t| t.item.2).collect()
}

fn complete_all<D: Dispatch<Item>>(d: &D, ts: Vec<Ticket<Item, D::Receipt>>) {
    let receipts: Vec<D::Receipt> = ts.into_iter().map(|t| t.receipt).collect();
    let n = receipts.len();
    assert_eq!(d.complete_many(receipts).unwrap(), n);
}

macro_rules! suite {
    ($name:ident, $dispatcher:ty) => {
        mod $name {
            use super::*;
            type L = $dispatcher;

            #[test]
            fn key_order_is_fifo_per_key_and_one_in_flight_per_key() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 0);
                push(&d, Some("a"), 0, 1);
                push(&d, Some("b"), 0, 2);
                push(&d, Some("a"), 0, 3);
                let mut first = pop(&d, 10);
                // Across lanes the hand-out order is not a contract; within
                // a lane it is.
                first.sort_by_key(|t| t.item.2);
                assert_eq!(offsets(&first), vec![0, 2], "one per key, keys in parallel");
                assert!(pop(&d, 10).is_empty(), "a and b are both busy");
                let mut first = first.into_iter();
                let a0 = first.next().unwrap();
                assert!(d.complete(a0.receipt).unwrap());
                assert_eq!(offsets(&pop(&d, 10)), vec![1]);
                assert_eq!(d.in_flight(), 2);
                assert_eq!(d.queued(), 1);
            }

            #[test]
            fn keyless_messages_are_unordered_under_key() {
                let d = make::<L>(Ordering::Key, 100, 100);
                for o in 0..4 {
                    push(&d, None, 0, o);
                }
                assert_eq!(offsets(&pop(&d, 10)), vec![0, 1, 2, 3]);
            }

            #[test]
            fn partition_order_is_one_in_flight_per_partition() {
                let d = make::<L>(Ordering::Partition, 100, 100);
                push(&d, Some("a"), 0, 0);
                push(&d, Some("b"), 0, 1);
                push(&d, Some("c"), 1, 0);
                push(&d, None, 1, 1);
                let ts = pop(&d, 10);
                assert_eq!(sorted(&ts), vec![(0, 0), (1, 0)]);
                complete_all(&d, ts);
                let ts = pop(&d, 10);
                assert_eq!(sorted(&ts), vec![(0, 1), (1, 1)]);
            }

            #[test]
            fn total_order_is_one_in_flight_in_push_order() {
                let d = make::<L>(Ordering::Total, 100, 100);
                push(&d, Some("a"), 3, 10);
                push(&d, Some("b"), 1, 5);
                push(&d, None, 2, 7);
                let mut seen = vec![];
                loop {
                    let ts = pop(&d, 10);
                    if ts.is_empty() {
                        break;
                    }
                    assert_eq!(ts.len(), 1);
                    seen.push((ts[0].item.1, ts[0].item.2));
                    complete_all(&d, ts);
                }
                assert_eq!(seen, vec![(3, 10), (1, 5), (2, 7)]);
            }

            #[test]
            fn unordered_hands_out_everything_in_push_order() {
                let d = make::<L>(Ordering::Unordered, 100, 100);
                push(&d, Some("a"), 0, 0);
                push(&d, Some("a"), 0, 1);
                push(&d, Some("a"), 1, 0);
                assert_eq!(
                    pop(&d, 10).iter().map(|t| (t.item.1, t.item.2)).collect::<Vec<_>>(),
                    vec![(0, 0), (0, 1), (1, 0)]
                );
            }

            #[test]
            fn a_busy_key_does_not_starve_others() {
                let d = make::<L>(Ordering::Key, 10_000, 1);
                for o in 0..1000 {
                    push(&d, Some("hot"), 0, o);
                }
                for (i, k) in ["x", "y", "z"].iter().enumerate() {
                    push(&d, Some(k), 1, i as i64);
                }
                // With one slot in flight, the other keys are served within
                // a few turns (one rotation over the shards at most), not
                // after the hot key's 1000.
                let mut keys = vec![];
                for _ in 0..24 {
                    let ts = pop(&d, 1);
                    keys.push(ts[0].item.0.clone().unwrap());
                    complete_all(&d, ts);
                }
                let others: HashSet<_> = keys.iter().filter(|k| *k != "hot").cloned().collect();
                assert_eq!(others.len(), 3, "served: {keys:?}");
            }

            #[test]
            fn max_in_flight_caps_pops() {
                let d = make::<L>(Ordering::Unordered, 100, 3);
                for o in 0..10 {
                    push(&d, None, 0, o);
                }
                let ts = pop(&d, 10);
                assert_eq!(ts.len(), 3);
                assert!(pop(&d, 10).is_empty());
                complete_all(&d, ts);
                assert_eq!(pop(&d, 10).len(), 3);
            }

            #[test]
            fn capacity_bounds_queued_plus_in_flight() {
                let d = make::<L>(Ordering::Key, 5, 100);
                let batch: Vec<_> = (0..8).map(|o| prep(&d, Some("k"), 0, o)).collect();
                let acc = d.push_many(batch).unwrap();
                assert_eq!(acc.count, 5);
                assert_eq!(acc.rejected.iter().map(|i| i.2).collect::<Vec<_>>(), vec![5, 6, 7]);
                assert_eq!(d.push(prep(&d, Some("k"), 0, 5)), Err(Error::QueueFull { capacity: 5 }));
                let ts = pop(&d, 10);
                assert_eq!(ts.len(), 1);
                assert_eq!(d.free_capacity(), 0, "in flight still counts");
                complete_all(&d, ts);
                assert_eq!(d.free_capacity(), 1);
                push(&d, Some("k"), 0, 5);
            }

            #[test]
            fn watermark_waits_for_the_lowest_outstanding_offset() {
                let d = make::<L>(Ordering::Key, 100, 100);
                for (k, o) in [("a", 10), ("b", 11), ("c", 12)] {
                    push(&d, Some(k), 0, o);
                }
                push(&d, Some("x"), 1, 0);
                assert_eq!(d.committable(), vec![(0, 10), (1, 0)]);
                let mut ts = pop(&d, 10);
                ts.sort_by_key(|t| (t.item.1, t.item.2));
                let mut it = ts.into_iter();
                let (a, b, c, x) =
                    (it.next().unwrap(), it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
                d.complete(c.receipt).unwrap();
                d.complete(b.receipt).unwrap();
                assert_eq!(d.committable(), vec![(0, 10), (1, 0)]);
                d.complete(a.receipt).unwrap();
                d.complete(x.receipt).unwrap();
                assert_eq!(d.committable(), vec![(0, 13), (1, 1)]);
            }

            #[test]
            fn offset_gaps_do_not_block_the_watermark() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 5);
                push(&d, Some("b"), 0, 900);
                complete_all(&d, pop(&d, 10));
                assert_eq!(d.committable(), vec![(0, 901)]);
            }

            #[test]
            fn retry_goes_back_to_the_head_and_blocks_the_key() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 0);
                push(&d, Some("a"), 0, 1);
                push(&d, Some("b"), 0, 2);
                let mut ts = pop(&d, 10);
                ts.sort_by_key(|t| t.item.2);
                assert_eq!(offsets(&ts), vec![0, 2]);
                let mut it = ts.into_iter();
                let a0 = it.next().unwrap();
                assert_eq!(a0.receipt.attempt(), 0);
                assert!(matches!(d.retry(a0.receipt, a0.item).unwrap(), Retried::Requeued));
                let again = pop(&d, 10);
                assert_eq!(offsets(&again), vec![0], "the retried message, not offset 1");
                assert_eq!(again[0].receipt.attempt(), 1);
                assert_eq!(d.committable(), vec![(0, 0)]);
                complete_all(&d, again);
                assert_eq!(offsets(&pop(&d, 10)), vec![1]);
                assert_eq!(d.stats().retried, 1);
            }

            #[test]
            fn revoke_drops_queued_and_stales_in_flight() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 0);
                push(&d, Some("a"), 0, 1);
                push(&d, Some("b"), 1, 0);
                push(&d, Some("a"), 1, 1);
                let ts = pop(&d, 10);
                assert_eq!(ts.len(), 2); // a@0/0 and b@1/0
                let revoked = d.revoke(&[0]);
                assert_eq!(revoked.count, 1, "a@0/1 was queued");
                assert_eq!(d.committable(), vec![(1, 0)]);
                let (mut stale, mut live) = (0, 0);
                for t in ts {
                    if d.complete(t.receipt).unwrap() { live += 1 } else { stale += 1 }
                }
                assert_eq!((stale, live), (1, 1));
                // The revoked message is gone (dropped at once, or skipped
                // when reached); key a's partition-1 message runs.
                let popped = d.pop_ready(10);
                assert_eq!(revoked.discarded.len() + popped.discarded.len(), 1);
                assert_eq!(
                    popped.tickets.iter().map(|t| (t.item.1, t.item.2)).collect::<Vec<_>>(),
                    vec![(1, 1)]
                );
                complete_all(&d, popped.tickets);
                // After a revoke the partition may start again, at any offset.
                push(&d, Some("a"), 0, 0);
                assert_eq!(d.committable(), vec![(0, 0), (1, 2)]);
                let s = d.stats();
                assert_eq!((s.pushed, s.completed, s.stale, s.revoked), (5, 2, 1, 1));
                assert_eq!(s.tombstones, 0);
            }

            #[test]
            fn retry_of_a_revoked_message_drops_it() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 0);
                let t = pop(&d, 1).pop().unwrap();
                d.revoke(&[0]);
                assert!(matches!(d.retry(t.receipt, t.item).unwrap(), Retried::Stale(_)));
                assert_eq!(d.stats().stale, 1);
                assert_eq!(d.free_capacity(), 100);
            }

            #[test]
            fn bad_offsets_refuse_the_whole_batch() {
                let d = make::<L>(Ordering::Key, 100, 100);
                push(&d, Some("a"), 0, 10);
                let batch =
                    vec![prep(&d, Some("b"), 1, 0), prep(&d, Some("c"), 0, 11), prep(&d, Some("d"), 0, 11)];
                let err = d.push_many(batch).unwrap_err();
                assert_eq!(
                    err,
                    Error::InBatch {
                        index: 2,
                        partition: 0,
                        error: Box::new(Error::OffsetOrder { offset: 11, last: 11 })
                    }
                );
                assert_eq!(d.queued(), 1, "nothing of the batch was applied");
                assert_eq!(d.committable(), vec![(0, 10)]);
                let err = d.push(prep(&d, Some("a"), 0, -1)).unwrap_err();
                assert!(matches!(err.root(), Error::InvalidArgument(_)));
            }

            #[test]
            fn tickets_of_another_dispatcher_are_refused() {
                let d1 = make::<L>(Ordering::Key, 10, 10);
                let d2 = make::<L>(Ordering::Key, 10, 10);
                push(&d1, Some("a"), 0, 0);
                let t = pop(&d1, 1).pop().unwrap();
                assert_eq!(d2.complete(t.receipt).unwrap_err(), Error::ForeignTicket);
            }

            #[test]
            fn idle_lanes_are_swept() {
                // Lanes beyond the capacity are swept.
                let d = make::<L>(Ordering::Key, 20_000, 20_000);
                for round in 0..4 {
                    let keys: Vec<String> = (0..20_000).map(|i| format!("k{round}-{i}")).collect();
                    let batch: Vec<_> =
                        keys.iter().enumerate().map(|(i, k)| prep(&d, Some(k), round, i as i64)).collect();
                    assert_eq!(d.push_many(batch).unwrap().count, 20_000);
                    let ts = pop(&d, 100_000);
                    assert_eq!(ts.len(), 20_000);
                    complete_all(&d, ts);
                }
                let lanes = d.stats().lanes;
                assert!(lanes <= 40_000, "80,000 keys seen, {lanes} lanes kept (at most twice the capacity)");
            }

            #[test]
            fn idle_lanes_are_swept_by_small_completions() {
                // The runtime's shape: completions in calls of 64, so a
                // sweep pass advances a step per call.
                let d = make::<L>(Ordering::Key, 4_096, 4_096);
                for round in 0..16 {
                    let keys: Vec<String> = (0..4_096).map(|i| format!("k{round}-{i}")).collect();
                    let batch: Vec<_> =
                        keys.iter().enumerate().map(|(i, k)| prep(&d, Some(k), round, i as i64)).collect();
                    assert_eq!(d.push_many(batch).unwrap().count, 4_096);
                    let mut ts = pop(&d, 100_000);
                    assert_eq!(ts.len(), 4_096);
                    while !ts.is_empty() {
                        let rest = ts.split_off(ts.len().min(64));
                        complete_all(&d, std::mem::replace(&mut ts, rest));
                    }
                }
                let lanes = d.stats().lanes;
                assert!(lanes <= 3 * 4_096, "65,536 keys seen, {lanes} lanes kept (capacity 4,096)");
            }

            #[test]
            fn config_is_validated() {
                assert!(L::new(Config { capacity: 0, ..Config::default() }).is_err());
                assert!(L::new(Config { max_in_flight: 0, ..Config::default() }).is_err());
                assert!("sideways".parse::<Ordering>().is_err());
                for o in ["total", "partition", "key", "none"] {
                    assert_eq!(o.parse::<Ordering>().unwrap().as_str(), o);
                }
            }

            #[test]
            fn stress_many_threads_keep_per_key_order() {
                stress::<L>(Ordering::Key, false, 101);
            }

            #[test]
            fn stress_with_lanes_swept_while_pushed_to() {
                // Far more keys than the capacity keeps lanes for: lanes are
                // swept and retired all along, also between a push's lookup
                // of a lane and its push to it.
                stress::<L>(Ordering::Key, false, 50_000);
            }

            #[test]
            fn stress_with_concurrent_revokes_loses_nothing() {
                stress::<L>(Ordering::Key, true, 101);
            }

            #[test]
            fn stress_partition_order() {
                stress::<L>(Ordering::Partition, false, 101);
            }
        }
    };
}

suite!(shipped, Dispatcher<Item>);

/// Feeders push disjoint partitions in offset order (keys shared across
/// partitions), workers pop, sometimes retry, complete. An independent
/// checker asserts that no lane ever has two messages in flight and that each
/// key's offsets, per partition, are completed in increasing order. With
/// `revokes`, a chaos thread revokes partitions meanwhile; every pushed
/// message must still end up completed, stale, or counted as revoked.
fn stress<L: Dispatch<Item> + 'static>(ordering: Ordering, revokes: bool, keys: usize) {
    use std::sync::atomic::{AtomicBool, Ordering as A};
    use std::sync::{Arc, Mutex};

    const FEEDERS: i32 = 3;
    // KEYLANE_STRESS_SCALE=50 makes a longer hunt for races.
    let scale: i64 = std::env::var("KEYLANE_STRESS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let per_feeder: i64 = 20_000 * scale;
    const WORKERS: usize = 3;
    let d = Arc::new(make::<L>(ordering, 5_000, 256));
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let last_done: Arc<Mutex<HashMap<(String, i32), i64>>> = Arc::default();
    let feeding_done = Arc::new(AtomicBool::new(false));

    let lane_of = move |item: &Item| -> String {
        match ordering {
            Ordering::Key => item.0.clone().unwrap(),
            Ordering::Partition => format!("p{}", item.1),
            _ => unreachable!(),
        }
    };

    let mut threads = vec![];
    for f in 0..FEEDERS {
        let d = Arc::clone(&d);
        threads.push(std::thread::spawn(move || {
            let mut offset = 0i64;
            // Each feeder owns two partitions.
            let parts = [f * 2, f * 2 + 1];
            let mut next = [0i64; 2];
            while offset < per_feeder {
                let n = (1 + (offset % 97)).min(per_feeder - offset) as usize;
                let batch: Vec<_> = (0..n)
                    .map(|i| {
                        let which = (offset as usize + i) % 2;
                        let o = next[which];
                        next[which] += 1 + (o % 5 == 0) as i64; // some gaps
                        let key = format!("k{}", (offset as usize + i) % keys);
                        prep(&*d, Some(&key), parts[which], o)
                    })
                    .collect();
                let acc = match d.push_many(batch) {
                    Ok(acc) => acc,
                    // A revoke forgot the partition's last offset; never here
                    // since offsets only grow, but keep the feeder honest.
                    Err(e) => panic!("{e}"),
                };
                // Re-push what did not fit, in order, until it fits.
                let mut rest = acc.rejected;
                while !rest.is_empty() {
                    std::thread::yield_now();
                    let again: Vec<_> =
                        rest.into_iter().map(|it| prep(&*d, it.0.as_deref(), it.1, it.2)).collect();
                    rest = d.push_many(again).unwrap().rejected;
                }
                offset += n as i64;
            }
        }));
    }
    let revoked_any = Arc::new(AtomicBool::new(false));
    if revokes {
        let d = Arc::clone(&d);
        let done = Arc::clone(&feeding_done);
        let revoked_any = Arc::clone(&revoked_any);
        threads.push(std::thread::spawn(move || {
            let mut p = 0;
            while !done.load(A::Relaxed) {
                std::thread::sleep(std::time::Duration::from_micros(300));
                d.revoke(&[p % (FEEDERS * 2)]);
                revoked_any.store(true, A::Relaxed);
                p += 1;
            }
        }));
    }
    let mut workers = vec![];
    for w in 0..WORKERS {
        let d = Arc::clone(&d);
        let in_flight = Arc::clone(&in_flight);
        let last_done = Arc::clone(&last_done);
        let done = Arc::clone(&feeding_done);
        workers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                let popped = d.pop_ready(64);
                if popped.tickets.is_empty() {
                    if done.load(A::Acquire) && d.queued() == 0 && d.in_flight() == 0 {
                        break;
                    }
                    std::thread::yield_now();
                    continue;
                }
                for t in &popped.tickets {
                    assert!(
                        in_flight.lock().unwrap().insert(lane_of(&t.item)),
                        "two in flight on one lane: {:?}",
                        t.item
                    );
                }
                let mut receipts = vec![];
                for t in popped.tickets {
                    n += 1;
                    let lane = lane_of(&t.item);
                    if (n + w as u64) % 17 == 0 && t.receipt.attempt() == 0 {
                        assert!(in_flight.lock().unwrap().remove(&lane));
                        let _ = d.retry(t.receipt, t.item).unwrap();
                        continue;
                    }
                    let key = (t.item.0.clone().unwrap(), t.item.1);
                    // Record the order before the lane is released, so the
                    // next message of the key cannot record first.
                    let mut last = last_done.lock().unwrap();
                    assert!(in_flight.lock().unwrap().remove(&lane));
                    if revokes {
                        // Complete one by one: only live completions count;
                        // a stale ticket's partition was forgotten.
                        if d.complete(t.receipt).unwrap() {
                            if let Some(prev) = last.insert(key, t.item.2) {
                                assert!(
                                    prev < t.item.2,
                                    "key {:?} went back from {prev} to {}",
                                    t.item.0,
                                    t.item.2
                                );
                            }
                        }
                    } else {
                        if let Some(prev) = last.insert(key, t.item.2) {
                            assert!(
                                prev < t.item.2,
                                "key {:?} went back from {prev} to {}",
                                t.item.0,
                                t.item.2
                            );
                        }
                        receipts.push(t.receipt);
                    }
                }
                d.complete_many(receipts).unwrap();
            }
        }));
    }
    for t in threads.drain(..FEEDERS as usize) {
        t.join().unwrap();
    }
    feeding_done.store(true, A::Release);
    for t in threads {
        t.join().unwrap();
    }
    for w in workers {
        w.join().unwrap();
    }
    let s = d.stats();
    let pushed = (FEEDERS as u64) * per_feeder as u64;
    if keys > 5_000 {
        assert!(s.lanes < keys.min(pushed as usize) / 2, "idle lanes were swept meanwhile: {s:?}");
    }
    assert_eq!(s.pushed, pushed);
    assert_eq!((s.queued, s.in_flight, s.tombstones), (0, 0, 0), "{s:?}");
    assert_eq!(d.free_capacity(), 5_000, "nothing leaked");
    assert_eq!(s.completed + s.stale + s.revoked, pushed, "{s:?}");
    if !revokes {
        assert_eq!(s.completed, pushed);
        // Every partition is fully committed.
        for (p, w) in d.committable() {
            assert!(w > 0, "partition {p}");
        }
        assert_eq!(d.committable().len(), (FEEDERS * 2) as usize);
    } else {
        assert!(revoked_any.load(A::Relaxed));
    }
}

#[test]
fn drop_queued_keeps_the_watermark_and_in_flight_is_counted() {
    let d: Dispatcher<Item> = make(Ordering::Key, 100, 100);
    for (k, o) in [("a", 0), ("b", 1), ("a", 2), ("c", 3)] {
        push(&d, Some(k), 0, o);
    }
    push(&d, Some("x"), 1, 0);
    let ts = pop(&d, 10); // a@0, b@1, c@3 on partition 0; x@0 on 1
    assert_eq!(ts.len(), 4);
    assert_eq!((d.in_flight_of(&[0]), d.in_flight_of(&[1]), d.in_flight_of(&[0, 1, 7])), (3, 1, 4));
    // a@2 is queued: dropping it leaves offset 2 outstanding.
    let dropped = d.drop_queued(&[0]);
    assert_eq!(dropped.count, 1);
    assert_eq!(d.queued(), 0);
    let mut ts: Vec<_> = ts.into_iter().filter(|t| t.item.1 == 0).collect();
    ts.sort_by_key(|t| t.item.2);
    complete_all(&d, ts); // the in-flight ones finish and count
    assert_eq!(d.in_flight_of(&[0]), 0);
    assert_eq!(d.committable(), vec![(0, 2), (1, 0)], "stops below the dropped offset 2");
    // Then the revoke forgets it, and nothing of partition 0 is handed out:
    // the dropped a@2 comes back only as a discarded item.
    assert_eq!(d.revoke(&[0]).count, 0);
    let popped = d.pop_ready(10);
    assert!(popped.tickets.is_empty());
    assert_eq!(popped.discarded, vec![(Some("a".to_owned()), 0, 2)]);
    assert_eq!(d.committable(), vec![(1, 0)]);
    assert_eq!(d.stats().revoked, 1);
    assert_eq!(d.stats().tombstones, 0);
    assert_eq!(d.free_capacity(), 99, "x@0 still in flight");
}

#[test]
fn retries_and_stale_completions_leave_in_flight() {
    let d: Dispatcher<Item> = make(Ordering::Key, 100, 100);
    push(&d, Some("a"), 0, 0);
    push(&d, Some("b"), 0, 1);
    let mut ts = pop(&d, 10);
    ts.sort_by_key(|t| t.item.2);
    let mut it = ts.into_iter();
    let (a, b) = (it.next().unwrap(), it.next().unwrap());
    assert_eq!(d.in_flight_of(&[0]), 2);
    d.retry(a.receipt, a.item).unwrap();
    assert_eq!(d.in_flight_of(&[0]), 1);
    d.revoke(&[0]);
    assert!(!d.complete(b.receipt).unwrap(), "stale");
    assert_eq!(d.in_flight_of(&[0]), 0);
}

#[test]
fn dropped_messages_hold_the_watermark_across_completion_blocks() {
    // 600 messages on one partition (more than two 256-slot completion
    // blocks), a key each: the first 100 in flight, the rest dropped. Once
    // the tombstones are passed over and the 100 complete, whole blocks are
    // resolved — and the watermark must still stop at the first dropped
    // offset, not jump past the dropped messages with the freed blocks.
    let d: Dispatcher<Item> = make(Ordering::Key, 10_000, 10_000);
    for o in 0..600 {
        push(&d, Some(&format!("k{o}")), 0, o);
    }
    let ts = pop(&d, 100);
    assert_eq!(offsets(&ts), (0..100).collect::<Vec<_>>());
    assert_eq!(d.drop_queued(&[0]).count, 500);
    let mut discarded = 0;
    for _ in 0..100 {
        let popped = d.pop_ready(1_000);
        assert!(popped.tickets.is_empty());
        discarded += popped.discarded.len();
        if discarded == 500 {
            break;
        }
    }
    assert_eq!(discarded, 500);
    complete_all(&d, ts);
    assert_eq!(d.committable(), vec![(0, 100)]);
    assert_eq!(d.committable(), vec![(0, 100)], "and again, after the blocks were looked at");
    // A revoke forgets them; pushing again starts a new watermark.
    d.revoke(&[0]);
    push(&d, Some("k"), 0, 100);
    let again = pop(&d, 10);
    complete_all(&d, again);
    assert_eq!(d.committable(), vec![(0, 101)]);
}

#[test]
fn a_drop_in_the_middle_of_a_block_separates_old_messages_from_new() {
    // Entries find their generation in their completion block: a drop seals
    // the block, so messages pushed after it land in a new one. Old ones
    // come back discarded, new ones are handed out, retry counts survive,
    // and the watermark runs across the sealed block.
    let d: Dispatcher<Item> = make(Ordering::Key, 1_000, 1_000);
    for o in 0..10 {
        push(&d, Some("a"), 0, o);
    }
    let first = pop(&d, 10);
    assert_eq!(offsets(&first), vec![0]);
    assert_eq!(d.drop_queued(&[0]).count, 9);
    for o in 10..13 {
        push(&d, Some("b"), 0, o);
    }
    complete_all(&d, first);
    let popped = d.pop_ready(100);
    assert_eq!(popped.discarded.len(), 9, "a@1..9 were dropped");
    assert_eq!(offsets(&popped.tickets), vec![10]);
    let mut t = popped.tickets.into_iter().next().unwrap();
    for attempt in 0..3 {
        assert_eq!(t.receipt.attempt(), attempt);
        assert!(matches!(d.retry(t.receipt, t.item).unwrap(), Retried::Requeued));
        t = pop(&d, 10).into_iter().next().unwrap();
        assert_eq!(t.item.2, 10);
    }
    assert_eq!(t.receipt.attempt(), 3);
    complete_all(&d, vec![t]);
    let rest = pop(&d, 10);
    assert_eq!(offsets(&rest), vec![11]);
    assert_eq!(rest[0].receipt.attempt(), 0, "a retry count belongs to its slot only");
    complete_all(&d, rest);
    complete_all(&d, pop(&d, 10));
    // Offsets 1..9 were dropped: they hold the watermark at 1.
    assert_eq!(d.committable(), vec![(0, 1)]);
    d.revoke(&[0]);
    push(&d, Some("c"), 0, 50);
    complete_all(&d, pop(&d, 10));
    assert_eq!(d.committable(), vec![(0, 51)]);
    assert_eq!(d.free_capacity(), 1_000);
}

#[test]
fn retry_counts_of_one_block_set_from_many_threads_stay_apart() {
    // The first retry in a block installs its array of retry counts; racing
    // installers must agree on one, and each slot keeps its own count.
    use std::sync::Arc;
    let d: Arc<Dispatcher<Item>> = Arc::new(make(Ordering::Key, 1_000, 1_000));
    for o in 0..200 {
        push(&*d, Some(&format!("k{o}")), 0, o);
    }
    let tickets = pop(&*d, 200);
    let mut halves: [Vec<_>; 2] = [Vec::new(), Vec::new()];
    for (i, t) in tickets.into_iter().enumerate() {
        halves[i % 2].push(t);
    }
    let threads: Vec<_> = halves
        .into_iter()
        .map(|half| {
            let d = Arc::clone(&d);
            std::thread::spawn(move || {
                for t in half {
                    d.retry(t.receipt, t.item).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let again = pop(&*d, 200);
    assert_eq!(again.len(), 200);
    assert!(again.iter().all(|t| t.receipt.attempt() == 1));
    let twice: Vec<_> = again.into_iter().filter(|t| t.item.2 % 3 == 0).collect();
    let n = twice.len();
    for t in twice {
        d.retry(t.receipt, t.item).unwrap();
    }
    let last = pop(&*d, 200);
    assert_eq!(last.len(), n);
    assert!(last.iter().all(|t| t.receipt.attempt() == 2 && t.item.2 % 3 == 0));
}
