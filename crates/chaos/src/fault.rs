//! What is injected, and what is expected of each fault: how many lease changes it explains and
//! the bound its failover (or resume, or watchdog exit) must meet.

use std::time::Duration;

use serde::Serialize;

use crate::{KEEP_ALIVE, POLL, STEP_DOWN_AFTER, TTL};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Leader killed with SIGKILL.
    Kill9,
    /// Leader paused (SIGSTOP) past the TTL, then resumed.
    Sigstop,
    /// Leader cut off from PostgreSQL (blackholed); the standby still reaches it.
    DbCut,
    /// Leader cut off from the broker; restored after the takeover.
    BrokerCut,
    /// Broker restarted gracefully.
    BrokerRestart,
    /// Broker SIGKILLed after an autosave.
    BrokerKill,
    /// Broker SIGKILLed at full speed, no autosave wait: the broker's own limit (reported, not judged).
    BrokerKillNoSave,
    /// PostgreSQL restarted.
    PgRestart,
    /// Leader's queries delayed below the demotion deadline: there must be no failover.
    PgSlowBelow,
    /// Leader's queries delayed above the demotion deadline: a clean failover.
    PgSlowAbove,
    /// Three nodes started at the same instant: one leader, no shared epoch.
    SimultaneousStart,
    /// Demotion hangs (test-only switch): the watchdog exits the process before the TTL.
    HungDemotion,
    /// `leasehold step-down` during full-rate ingest.
    StepDown,
    /// SIGTERM to the leader during full-rate ingest.
    Sigterm,
    /// The database's primary host lost (keeper and postmaster killed); the manager promotes
    /// the standby.
    DbPrimaryLost,
    /// A planned database switchover (`pg_autoctl perform switchover`).
    DbSwitchover,
}

impl Fault {
    pub const ALL: [Fault; 16] = [
        Fault::Kill9,
        Fault::Sigstop,
        Fault::DbCut,
        Fault::BrokerCut,
        Fault::BrokerRestart,
        Fault::BrokerKill,
        Fault::BrokerKillNoSave,
        Fault::PgRestart,
        Fault::PgSlowBelow,
        Fault::PgSlowAbove,
        Fault::SimultaneousStart,
        Fault::HungDemotion,
        Fault::StepDown,
        Fault::Sigterm,
        Fault::DbPrimaryLost,
        Fault::DbSwitchover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 leader",
            Fault::Sigstop => "SIGSTOP leader > TTL",
            Fault::DbCut => "leader cut from Postgres",
            Fault::BrokerCut => "leader cut from broker",
            Fault::BrokerRestart => "broker restart",
            Fault::BrokerKill => "broker kill -9 after autosave",
            Fault::BrokerKillNoSave => "broker kill -9, no autosave wait",
            Fault::PgRestart => "Postgres restart",
            Fault::PgSlowBelow => "Postgres slow < deadline",
            Fault::PgSlowAbove => "Postgres slow > deadline",
            Fault::SimultaneousStart => "3 nodes start at once",
            Fault::HungDemotion => "demotion hangs (watchdog)",
            Fault::StepDown => "step-down at full rate",
            Fault::Sigterm => "SIGTERM at full rate",
            Fault::DbPrimaryLost => "database primary host lost",
            Fault::DbSwitchover => "database switchover",
        }
    }

    /// Most lease holder changes the fault explains.
    pub(crate) fn max_changes(self) -> usize {
        match self {
            // The hung node takes over from the stopped pair, then the pair takes over from it.
            Fault::HungDemotion => 2,
            Fault::BrokerRestart
            | Fault::BrokerKill
            | Fault::BrokerKillNoSave
            | Fault::PgSlowBelow => 0,
            _ => 1,
        }
    }

    /// The bound on failover (or resume, or watchdog exit) time this fault must meet.
    pub(crate) fn bound(self) -> Option<Duration> {
        match self {
            Fault::Kill9 | Fault::Sigstop | Fault::DbCut | Fault::PgSlowAbove => {
                Some(TTL + POLL + Duration::from_secs(2))
            }
            // Noticing a silent connection (missed PINGRESP) + the step-down grace + hand-over.
            Fault::BrokerCut => {
                Some(KEEP_ALIVE * 2 + STEP_DOWN_AFTER + TTL + Duration::from_secs(2))
            }
            Fault::StepDown | Fault::Sigterm => Some(Duration::from_secs(1)),
            Fault::HungDemotion => Some(TTL),
            Fault::BrokerRestart
            | Fault::BrokerKill
            | Fault::BrokerKillNoSave
            | Fault::PgRestart => Some(Duration::from_secs(10)),
            Fault::PgSlowBelow | Fault::SimultaneousStart => None,
            // The manager's detection (about 3 s with the test monitor's settings) and
            // promotion, then the lease's TTL and a poll.
            Fault::DbPrimaryLost => Some(Duration::from_secs(20)),
            Fault::DbSwitchover => Some(Duration::from_secs(15)),
        }
    }

    /// Run on a replicated database of their own (`dbfault`), not the matrix's environment.
    pub(crate) fn is_database_failover(self) -> bool {
        matches!(self, Fault::DbPrimaryLost | Fault::DbSwitchover)
    }

    /// Whether losses are the broker's documented limit rather than Leasehold's failure.
    pub(crate) fn loss_is_broker_limit(self) -> bool {
        self == Fault::BrokerKillNoSave
    }
}
