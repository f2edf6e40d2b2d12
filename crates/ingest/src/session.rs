//! The broker connection's life as plain state: what each event means is decided here without
//! I/O, so its transitions are unit-tested without a broker. [`crate::MqttIngest`] does the I/O
//! and calls one method per event.

use std::time::{Duration, Instant};

use leasehold_retry::{Backoff, Policy};

/// Disconnects within this time after CONNACK count toward a client-id conflict.
pub const QUICK_DISCONNECT: Duration = Duration::from_secs(3);
/// Consecutive quick disconnects that raise a client-id conflict.
pub const CONFLICT_AFTER: u32 = 3;
/// The first reconnect waits about this long; each failure doubles it up to `reconnect_max`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// One term's connection to the broker.
#[derive(Debug)]
pub struct Session {
    clean_session: bool,
    /// Whether a CONNACK without a session is unexpected on the first connect of this term.
    expect_session: bool,
    /// Connections made so far (1, 2, ...); a message is tagged with the one it arrived on.
    connections: u64,
    /// The connection acks may be written on. Bumped far past `connections` on a disconnect,
    /// so no ack of the old connection matches from then on.
    current: u64,
    connected_at: Option<Instant>,
    backoff: Backoff,
    quick_disconnects: u32,
    /// DISCONNECT sent after the drain: the next connection error is the end, not a reconnect.
    disconnecting: bool,
}

/// What a CONNACK meant.
#[derive(Debug, PartialEq, Eq)]
pub struct Connected {
    /// The connection's number, for tagging messages.
    pub conn: u64,
    /// Not the term's first connection.
    pub reconnect: bool,
    /// The broker had no session where one was expected: what it queued is gone.
    pub session_lost: bool,
}

/// What a connection error means.
#[derive(Debug, PartialEq)]
pub enum Dropped {
    /// It was the DISCONNECT of a drain: stop.
    Finished,
    /// Reconnect after `wait`; `conflict` when this is the `CONFLICT_AFTER`th quick disconnect
    /// in a row (another process uses the client id).
    Reconnect {
        wait: Duration,
        conflict: Option<u32>,
    },
}

impl Session {
    pub fn new(clean_session: bool, expect_session: bool, reconnect_max: Duration) -> Self {
        Session {
            clean_session,
            expect_session,
            connections: 0,
            current: 0,
            connected_at: None,
            backoff: Backoff::new(Policy::new(FIRST_BACKOFF, reconnect_max)),
            quick_disconnects: 0,
            disconnecting: false,
        }
    }

    /// The number of the connection messages now arrive on.
    pub fn conn(&self) -> u64 {
        self.connections
    }

    /// Whether an ack for a message of connection `conn` may be written now: only on the
    /// connection it came from (MQTT reuses packet ids per connection).
    pub fn may_ack(&self, conn: u64) -> bool {
        self.connected_at.is_some() && conn == self.current
    }

    pub fn is_disconnecting(&self) -> bool {
        self.disconnecting
    }

    /// CONNACK.
    pub fn connack(&mut self, session_present: bool, now: Instant) -> Connected {
        let reconnect = self.connections > 0;
        self.connections += 1;
        self.current = self.connections;
        self.connected_at = Some(now);
        self.backoff.reset();
        Connected {
            conn: self.connections,
            reconnect,
            session_lost: !self.clean_session
                && !session_present
                && (reconnect || self.expect_session),
        }
    }

    /// The connection is gone (or never came up). `jitter` in [0, 1) spreads reconnects.
    pub fn connection_error(&mut self, now: Instant, jitter: f64) -> Dropped {
        self.lost();
        let was_up = self.connected_at.take();
        if self.disconnecting {
            return Dropped::Finished;
        }
        match was_up {
            Some(t) if now.saturating_duration_since(t) < QUICK_DISCONNECT => {
                self.quick_disconnects += 1
            }
            Some(_) => self.quick_disconnects = 0,
            None => {}
        }
        let conflict = (self.quick_disconnects >= CONFLICT_AFTER).then(|| {
            let n = self.quick_disconnects;
            self.quick_disconnects = 0;
            n
        });
        let wait = self.backoff.fail_with(jitter).wait;
        Dropped::Reconnect { wait, conflict }
    }

    /// Every forwarded message is acknowledged after a drain: DISCONNECT goes out next.
    pub fn drained(&mut self) {
        self.disconnecting = true;
    }

    /// No ack of the current connection may be written any more.
    pub fn lost(&mut self) {
        self.current = self.current.wrapping_add(1_000_000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_connack_of_a_term_is_connection_one_and_not_a_reconnect() {
        let mut s = Session::new(false, false, secs(30));
        let t = Instant::now();
        let c = s.connack(false, t);
        assert_eq!(
            c,
            Connected {
                conn: 1,
                reconnect: false,
                session_lost: false
            }
        );
        assert!(s.may_ack(1));
        let c = s.connack(true, t);
        assert_eq!((c.conn, c.reconnect, c.session_lost), (2, true, false));
    }

    #[test]
    fn a_session_missing_on_a_reconnect_or_after_a_previous_leader_is_lost() {
        let t = Instant::now();
        let mut s = Session::new(false, true, secs(30));
        assert!(
            s.connack(false, t).session_lost,
            "a previous leader held it"
        );
        let mut s = Session::new(false, false, secs(30));
        assert!(!s.connack(false, t).session_lost, "a first session ever");
        assert!(s.connack(false, t).session_lost, "gone on a reconnect");
        let mut s = Session::new(true, true, secs(30));
        s.connack(false, t);
        assert!(!s.connack(false, t).session_lost, "observers start clean");
    }

    #[test]
    fn acks_of_an_earlier_connection_are_never_written() {
        let t = Instant::now();
        let mut s = Session::new(false, false, secs(30));
        s.connack(true, t);
        assert!(s.may_ack(1));
        s.connection_error(t + secs(10), 0.0);
        assert!(!s.may_ack(1), "disconnected");
        s.connack(true, t + secs(11));
        assert!(!s.may_ack(1), "a message of connection 1 on connection 2");
        assert!(s.may_ack(2));
        s.lost();
        assert!(!s.may_ack(2), "lost while paused");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_on_connack() {
        let t = Instant::now();
        let mut s = Session::new(false, false, Duration::from_millis(300));
        let waits: Vec<Duration> = (0..4)
            .map(|_| match s.connection_error(t, 1.0) {
                Dropped::Reconnect { wait, .. } => wait,
                Dropped::Finished => Duration::ZERO,
            })
            .collect();
        let ms = |m| Duration::from_millis(m);
        assert_eq!(waits, vec![ms(100), ms(200), ms(300), ms(300)]);
        s.connack(true, t);
        assert_eq!(
            s.connection_error(t + secs(60), 0.0),
            Dropped::Reconnect {
                wait: ms(50),
                conflict: None
            },
            "half of the first backoff at the lowest jitter"
        );
    }

    #[test]
    fn three_quick_disconnects_in_a_row_are_a_client_id_conflict() {
        let t = Instant::now();
        let mut s = Session::new(false, false, secs(30));
        let mut conflicts = Vec::new();
        for i in 0..7u64 {
            let at = t + secs(i * 10);
            s.connack(true, at);
            // The fourth connection lasts: it breaks the run.
            let up = if i == 3 { secs(5) } else { secs(1) };
            if let Dropped::Reconnect {
                conflict: Some(n), ..
            } = s.connection_error(at + up, 0.5)
            {
                conflicts.push((i, n));
            }
        }
        assert_eq!(
            conflicts,
            vec![(2, 3), (6, 3)],
            "0,1,2 quick; 3 lasted; 4,5,6 quick"
        );
        let Dropped::Reconnect { conflict, .. } = s.connection_error(t + secs(100), 0.5) else {
            panic!("not draining");
        };
        assert_eq!(
            conflict, None,
            "an error before any CONNACK is not a quick disconnect"
        );
    }

    #[test]
    fn after_the_drain_a_connection_error_is_the_end() {
        let t = Instant::now();
        let mut s = Session::new(false, false, secs(30));
        s.connack(true, t);
        s.drained();
        assert!(s.is_disconnecting());
        assert_eq!(s.connection_error(t, 0.0), Dropped::Finished);
        assert!(!s.may_ack(1));
    }
}
