//! Deadlines for many connections at O(expiring) cost: a hashed timer wheel.
//!
//! A connection keeps its own deadline; the wheel only holds *reminders*. When a reminder fires,
//! the owner looks at its current deadline: passed → act (close, 504…); moved later (traffic on an
//! idle timer) → arm a new reminder at the new deadline. So traffic never touches the wheel, and a
//! tick costs only the reminders that fall due in it, never a scan of all connections.

use std::time::Duration;

use crate::clock::duration_ns;

/// Who a reminder is for: a connection slot and the id of the connection that held it when the
/// reminder was armed (slots are reused; a stale reminder carries an old id and is ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey {
    /// Index of the connection slot.
    pub slot: u32,
    /// Unique id of the connection that armed the reminder.
    pub id: u64,
}

/// Reminders an expired bucket may keep room for without holding any: the wheel turns through
/// every bucket, so room left behind by a burst would be kept in each of them, for good.
const KEPT_ROOM: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Reminder {
    key: TimerKey,
    due_tick: u64,
}

/// A hashed timer wheel with a fixed tick; reminders fire at the first tick at or after their
/// deadline (so up to one tick late, never early).
#[derive(Debug)]
pub struct TimerWheel {
    slots: Vec<Vec<Reminder>>,
    tick_ns: u64,
    /// The next tick not yet processed.
    next_tick: u64,
    len: usize,
}

impl TimerWheel {
    /// A wheel of `slots` buckets of `tick` each, starting at `now_ns`.
    pub fn new(tick: Duration, slots: usize, now_ns: u64) -> TimerWheel {
        let tick_ns = duration_ns(tick).max(1);
        TimerWheel {
            slots: vec![Vec::new(); slots.max(1)],
            tick_ns,
            next_tick: now_ns / tick_ns,
            len: 0,
        }
    }

    /// The wheel's tick.
    pub fn tick(&self) -> Duration {
        Duration::from_nanos(self.tick_ns)
    }

    /// Number of reminders held (including stale ones not yet fired).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no reminder is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reminders the buckets have room for: what the wheel's memory is sized by.
    pub fn room(&self) -> usize {
        self.slots.iter().map(Vec::capacity).sum()
    }

    /// Arms a reminder for `key` at `deadline_ns`.
    pub fn arm(&mut self, key: TimerKey, deadline_ns: u64) {
        // Round up: a reminder never fires before its deadline.
        let due_tick = deadline_ns.div_ceil(self.tick_ns).max(self.next_tick);
        let bucket = (due_tick % self.slots.len() as u64) as usize;
        self.slots[bucket].push(Reminder { key, due_tick });
        self.len += 1;
    }

    /// Moves the wheel to `now_ns` and appends every reminder now due to `fired`.
    pub fn expire(&mut self, now_ns: u64, fired: &mut Vec<TimerKey>) {
        let now_tick = now_ns / self.tick_ns;
        if now_tick < self.next_tick {
            return;
        }
        // Past one full turn every bucket is visited once, whatever the gap.
        let turns = (now_tick - self.next_tick + 1).min(self.slots.len() as u64);
        for offset in 0..turns {
            let bucket = ((self.next_tick + offset) % self.slots.len() as u64) as usize;
            let before = self.slots[bucket].len();
            self.slots[bucket].retain(|reminder| {
                let due = reminder.due_tick <= now_tick;
                if due {
                    fired.push(reminder.key);
                }
                !due
            });
            self.len -= before - self.slots[bucket].len();
            // A bucket fills during its tick and empties when the wheel comes back to it: it
            // gives back the room of a burst (or of a steady rate that has since dropped)
            // instead of every bucket keeping the most it ever held. Refilling costs a few
            // reallocations per tick.
            let reminders = &mut self.slots[bucket];
            if reminders.capacity() > KEPT_ROOM.max(4 * reminders.len()) {
                reminders.shrink_to(2 * reminders.len());
            }
        }
        self.next_tick = now_tick + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn key(slot: u32) -> TimerKey {
        TimerKey {
            slot,
            id: u64::from(slot) + 100,
        }
    }

    fn expire(wheel: &mut TimerWheel, now_ns: u64) -> Vec<TimerKey> {
        let mut fired = Vec::new();
        wheel.expire(now_ns, &mut fired);
        fired
    }

    #[test]
    fn fires_at_the_first_tick_at_or_after_the_deadline_never_before() {
        let mut wheel = TimerWheel::new(Duration::from_millis(10), 64, 0);
        wheel.arm(key(1), 25 * MS);
        assert!(expire(&mut wheel, 20 * MS).is_empty());
        assert!(expire(&mut wheel, 29 * MS).is_empty());
        assert_eq!(expire(&mut wheel, 30 * MS), vec![key(1)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_one_turn_wait_for_their_round() {
        let mut wheel = TimerWheel::new(Duration::from_millis(10), 8, 0);
        wheel.arm(key(1), 1000 * MS); // 100 ticks: many turns of an 8-bucket wheel
        for t in (10..1000).step_by(10) {
            assert!(
                expire(&mut wheel, t * MS).is_empty(),
                "fired early at {t} ms"
            );
        }
        assert_eq!(expire(&mut wheel, 1000 * MS), vec![key(1)]);
    }

    #[test]
    fn a_long_gap_between_expiries_fires_everything_due() {
        let mut wheel = TimerWheel::new(Duration::from_millis(10), 8, 0);
        for slot in 0..20 {
            wheel.arm(key(slot), u64::from(slot) * 7 * MS);
        }
        wheel.arm(key(99), 10_000 * MS);
        let fired = expire(&mut wheel, 5_000 * MS);
        assert_eq!(fired.len(), 20);
        assert_eq!(wheel.len(), 1);
    }

    #[test]
    fn buckets_give_back_the_room_of_a_burst_once_it_expired() {
        // A thousand reminders due in each tick of one turn (a churn of short connections),
        // then the wheel turns on with nothing armed.
        let mut wheel = TimerWheel::new(Duration::from_millis(10), 64, 0);
        for tick in 0..64u64 {
            for n in 0..1000 {
                wheel.arm(key(n), tick * 10 * MS + MS);
            }
        }
        assert!(wheel.room() >= 64 * 1000);
        let fired = expire(&mut wheel, 64 * 10 * MS + MS);
        assert_eq!(fired.len(), 64 * 1000);
        assert!(wheel.is_empty());
        assert!(
            wheel.room() <= 64 * KEPT_ROOM,
            "an empty wheel keeps room for {} reminders",
            wheel.room()
        );
        // Reminders still waiting for a later turn keep their bucket's room.
        for n in 0..100 {
            wheel.arm(key(n), 10_000 * MS);
        }
        expire(&mut wheel, 2_000 * MS);
        assert_eq!(wheel.len(), 100);
        assert!(wheel.room() >= 100);
    }

    #[test]
    fn a_deadline_in_the_past_fires_at_the_next_expiry() {
        let mut wheel = TimerWheel::new(Duration::from_millis(10), 8, 100 * MS);
        expire(&mut wheel, 200 * MS);
        wheel.arm(key(3), 50 * MS);
        assert_eq!(expire(&mut wheel, 210 * MS), vec![key(3)]);
    }
}
