//! Model checks of the dispatcher's two lock-free state machines, under
//! every interleaving loom can reach (bounded preemptions): the lane
//! hand-off and the completion window. Run with `scripts/loom`
//! (`RUSTFLAGS="--cfg loom" cargo test --test loom --release`).
#![cfg(loom)]
#![allow(unsafe_code)]

use keylane_core::dispatch::lane::{Lane, Pushed, Released};
use keylane_core::dispatch::window::{Slot, Window};
use loom::sync::atomic::AtomicBool;
use loom::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use loom::sync::{Arc, Mutex};
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// What the workers see: the order messages were handed out in, and
/// whether one ran while another of the lane was running.
#[derive(Default)]
struct Log {
    handed: Vec<u32>,
}

/// Two pushers (one pushing 1 then 2, one pushing 10) and two workers
/// passing the lane's token through a ready counter (standing in for the
/// dispatcher's ready queue). Every message is handed out exactly once,
/// never two at a time, and 1 before 2.
#[test]
fn lane_hands_out_each_message_once_in_order_one_at_a_time() {
    model(|| {
        let lane = Arc::new(Lane::<u32>::new(7));
        let ready = Arc::new(Mutex::new(0usize));
        let log = Arc::new(Mutex::new(Log::default()));
        let running = Arc::new(AtomicBool::new(false));

        let pusher = |values: Vec<u32>| {
            let (lane, ready) = (Arc::clone(&lane), Arc::clone(&ready));
            thread::spawn(move || {
                for v in values {
                    match lane.push(v) {
                        Pushed::Schedule => *ready.lock().unwrap() += 1,
                        Pushed::Queued => {}
                        Pushed::Retired(_) => unreachable!("nobody retires in this model"),
                    }
                }
            })
        };
        let p1 = pusher(vec![1, 2]);
        let p2 = pusher(vec![10]);

        // A worker takes a token if there is one, hands out one message,
        // releases. Bounded (no spinning): whatever is left is drained below,
        // on one thread, after everyone is done.
        let step = {
            let (lane, ready, log, running) =
                (Arc::clone(&lane), Arc::clone(&ready), Arc::clone(&log), Arc::clone(&running));
            move || {
                {
                    let mut r = ready.lock().unwrap();
                    if *r == 0 {
                        return false;
                    }
                    *r -= 1;
                }
                // SAFETY: this thread holds the lane's token.
                if let Some(v) = unsafe { lane.pop() } {
                    assert!(!running.swap(true, SeqCst), "two messages of one lane at once");
                    log.lock().unwrap().handed.push(v);
                    running.store(false, SeqCst);
                }
                // SAFETY: still the token holder.
                match unsafe { lane.release() } {
                    Released::Reschedule => *ready.lock().unwrap() += 1,
                    Released::Idle => {}
                }
                true
            }
        };
        let w1 = {
            let step = step.clone();
            thread::spawn(move || {
                for _ in 0..2 {
                    step();
                }
            })
        };
        step();
        step();
        p1.join().unwrap();
        p2.join().unwrap();
        w1.join().unwrap();
        while step() {}

        let handed = &log.lock().unwrap().handed;
        let mut sorted = handed.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![1, 2, 10], "each message exactly once");
        let at = |v| handed.iter().position(|&x| x == v).unwrap();
        assert!(at(1) < at(2), "FIFO per pusher: {handed:?}");
        assert!(lane.is_idle());
    });
}

/// A retry puts the message back at the head while a pusher adds more: the
/// retried message is handed out next, before anything pushed after it.
#[test]
fn a_retried_message_goes_first_again() {
    model(|| {
        let lane = Arc::new(Lane::<u32>::new(1));
        assert_eq!(lane.push(1), Pushed::Schedule);
        let p = {
            let lane = Arc::clone(&lane);
            thread::spawn(move || assert_eq!(lane.push(2), Pushed::Queued))
        };
        // SAFETY: this thread holds the token (from the first push).
        unsafe {
            assert_eq!(lane.pop(), Some(1));
            lane.push_front(1);
            assert_eq!(lane.pop(), Some(1));
        }
        p.join().unwrap();
        // SAFETY: as above.
        unsafe {
            assert_eq!(lane.pop(), Some(2));
            assert_eq!(lane.release(), Released::Idle);
        }
    });
}

/// Retiring races a push: either the push lands in the lane (and the lane
/// is not retired) or it gets its message back (and the lane is retired).
#[test]
fn retiring_never_swallows_a_push() {
    model(|| {
        let lane = Arc::new(Lane::<u32>::new(1));
        let p = {
            let lane = Arc::clone(&lane);
            thread::spawn(move || lane.push(5))
        };
        let retired = lane.try_retire();
        match p.join().unwrap() {
            Pushed::Retired(v) => {
                assert!(retired);
                assert_eq!(v, 5);
            }
            Pushed::Schedule => {
                assert!(!retired);
                // SAFETY: the push took the token; the test holds it now.
                assert_eq!(unsafe { lane.pop() }, Some(5));
            }
            Pushed::Queued => unreachable!("the lane was idle"),
        }
    });
}

/// The feeder appends offsets 10, 11, 13 (blocks of two slots under loom,
/// so the chain grows) while two completers finish them out of order and a
/// reader asks for the watermark twice. A watermark never moves back, and
/// never passes an offset that was not completed when it was read.
#[test]
fn watermark_never_moves_back_nor_passes_an_unfinished_offset() {
    model(|| {
        let w = Arc::new(Window::new());
        let owner = std::ptr::null::<()>();
        let done: Arc<[AtomicBool; 3]> = Arc::new(std::array::from_fn(|_| AtomicBool::new(false)));
        // SAFETY (append): this thread is the only feeder.
        let first = unsafe { [w.append(10, owner, 0), w.append(11, owner, 0)] };
        let slots = Arc::new(Mutex::new(Vec::<Slot>::new()));
        let complete = |i: usize, slot: Slot, done: &[AtomicBool; 3]| {
            done[i].store(true, Relaxed);
            // SAFETY: each slot is resolved once, by this call.
            unsafe { slot.resolve(true) };
        };
        let c1 = {
            let done = Arc::clone(&done);
            let s = first[1];
            thread::spawn(move || complete(1, s, &done))
        };
        let feeder = {
            let (w, slots) = (Arc::clone(&w), Arc::clone(&slots));
            thread::spawn(move || {
                // SAFETY: the only feeder now (the main thread is done appending).
                let s = unsafe { w.append(13, std::ptr::null(), 0) };
                slots.lock().unwrap().push(s);
            })
        };
        let reader = {
            let (w, done) = (Arc::clone(&w), Arc::clone(&done));
            thread::spawn(move || {
                let offsets = [10i64, 11, 13];
                let mut last = None;
                for _ in 0..2 {
                    // SAFETY: this model never frees a block.
                    let mark = unsafe { w.watermark() };
                    if let (Some(prev), Some(now)) = (last, mark) {
                        assert!(now >= prev, "watermark went back from {prev} to {now}");
                    }
                    if let Some(m) = mark {
                        for (i, &o) in offsets.iter().enumerate() {
                            if o < m {
                                assert!(done[i].load(Acquire), "watermark {m} passed unfinished {o}");
                            }
                        }
                    }
                    last = mark.or(last);
                }
            })
        };
        complete(0, first[0], &done);
        feeder.join().unwrap();
        let third = slots.lock().unwrap()[0];
        complete(2, third, &done);
        c1.join().unwrap();
        reader.join().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { w.watermark() }, Some(14));
        let mut freed = 0;
        w.unlink_resolved(|block| {
            freed += 1;
            // SAFETY: no scanner runs any more.
            unsafe { Window::free_block(block) };
        });
        assert_eq!(freed, 1, "the full, resolved first block");
    });
}

/// A slot let go of without being done (a dropped message) holds the
/// watermark, even once its block is full and resolved and another block
/// follows: unlinking never frees the block that still decides it.
#[test]
fn a_dropped_slot_holds_the_watermark_while_blocks_are_unlinked() {
    model(|| {
        let w = Arc::new(Window::new());
        let owner = std::ptr::null::<()>();
        // SAFETY (append): this thread is the only feeder.
        let s = unsafe { [w.append(10, owner, 0), w.append(11, owner, 0), w.append(12, owner, 0)] };
        let t = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                // SAFETY: each slot is resolved once.
                unsafe { s[1].resolve(true) };
                w.unlink_resolved(|_| panic!("the first block is still needed"));
            })
        };
        // SAFETY: as above; the dropped one is let go of, not done.
        unsafe {
            s[0].resolve(false);
            s[2].resolve(true);
        }
        w.unlink_resolved(|_| panic!("the first block is still needed"));
        t.join().unwrap();
        // SAFETY: this model never frees a block.
        assert_eq!(unsafe { w.watermark() }, Some(10));
    });
}

/// Two threads retry messages of one block at once: the first retry of a
/// block installs its array of retry counts. Whichever install wins, both
/// counts land in it, each in its own slot (the loser's array is freed).
#[test]
fn racing_first_retries_of_a_block_keep_both_counts() {
    model(|| {
        let w = Window::new();
        // SAFETY (append): this thread is the only feeder.
        let s = unsafe { [w.append(10, std::ptr::null(), 0), w.append(11, std::ptr::null(), 0)] };
        let t = thread::spawn(move || {
            // SAFETY: this thread holds slot 1.
            unsafe { s[1].set_attempt(2) };
        });
        // SAFETY: this thread holds slot 0.
        unsafe { s[0].set_attempt(1) };
        t.join().unwrap();
        // SAFETY: both slots are unresolved; the join orders the reads.
        assert_eq!(unsafe { (s[0].attempt(), s[1].attempt()) }, (1, 2));
    });
}

/// A drop seals the tail block while a reader asks for the watermark: the
/// sealed slots (done, carrying the last offset) never move it past an
/// unfinished offset, and the next append starts a block of the new
/// generation.
#[test]
fn sealing_a_block_changes_no_watermark() {
    model(|| {
        let w = Arc::new(Window::new());
        // SAFETY (append): this thread is the only feeder. Under loom a block
        // has two slots; three appends leave the second block half full.
        let s = unsafe {
            [
                w.append(10, std::ptr::null(), 0),
                w.append(11, std::ptr::null(), 0),
                w.append(12, std::ptr::null(), 0),
            ]
        };
        // SAFETY: each slot is resolved once.
        unsafe { s[0].resolve(true) };
        let reader = {
            let w = Arc::clone(&w);
            thread::spawn(move || {
                // SAFETY: this model never frees a block.
                let mark = unsafe { w.watermark() };
                assert_eq!(mark, Some(11), "11 and 12 are not done");
            })
        };
        // SAFETY: the only feeder.
        unsafe { w.seal() };
        reader.join().unwrap();
        // SAFETY: as above.
        let next = unsafe { w.append(20, std::ptr::null(), 1) };
        // SAFETY: unresolved slots.
        unsafe {
            assert_eq!(next.generation(), 1);
            assert_eq!(s[2].generation(), 0);
            s[1].resolve(true);
            assert_eq!(w.watermark(), Some(12));
            s[2].resolve(true);
            assert_eq!(w.watermark(), Some(20));
            next.resolve(true);
            assert_eq!(w.watermark(), Some(21));
        }
    });
}
