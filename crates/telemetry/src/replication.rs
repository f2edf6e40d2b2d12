//! Whether the database's commits are synchronously replicated, as the store last read it
//! (`leasehold_store::replication::status`): "nothing lost" across a database failover holds
//! only when a commit waits for a standby. Plain data and its judgement; the SQL is in the store.

use serde::Serialize;

/// One standby streaming from this primary (a row of `pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Standby {
    /// The standby's `application_name` (what `synchronous_standby_names` names).
    pub application_name: Option<String>,
    /// `startup`, `catchup`, `streaming`, …; `None` when this role may not see it.
    pub state: Option<String>,
    /// `sync`, `quorum`, `potential` or `async`; `None` when this role may not see it.
    pub sync_state: Option<String>,
    /// How far behind the standby has flushed / replayed, in milliseconds (`None` when idle or
    /// hidden).
    pub flush_lag_ms: Option<f64>,
    pub replay_lag_ms: Option<f64>,
}

impl Standby {
    /// Whether a commit currently waits for this standby.
    pub fn is_sync(&self) -> bool {
        matches!(self.sync_state.as_deref(), Some("sync" | "quorum"))
    }
}

/// The replication of this database's commits, as this connection's role can see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicationStatus {
    /// This session's `synchronous_commit` (role and database settings included).
    pub synchronous_commit: String,
    /// The primary's `synchronous_standby_names` (empty: no commit waits for a standby).
    pub synchronous_standby_names: String,
    /// Standbys a commit waits for now (`sync_state` `sync` or `quorum`).
    pub sync_standbys: Vec<Standby>,
    /// Standbys a commit does not wait for (`async`, `potential`), or whose state is hidden.
    pub async_standbys: Vec<Standby>,
    /// Whether this role may see the standbys' state: PostgreSQL shows `pg_stat_replication`'s
    /// details only to superusers and members of `pg_read_all_stats` (or `pg_monitor`); without
    /// them a standby's `sync_state` is hidden and [`Self::synchronously_replicated`] is false.
    pub details_visible: bool,
    /// Standbys whose `sync_state` this role could not see.
    pub hidden_standbys: usize,
    /// The server is itself a standby (in recovery): it accepts no commits.
    pub in_recovery: bool,
}

/// The shown form of a [`ReplicationStatus`]: `synchronous` and why not, the settings, the
/// standbys.
#[derive(Debug, Serialize)]
pub struct ReplicationView<'a> {
    pub synchronous: bool,
    pub why_not: Option<String>,
    pub synchronous_commit: &'a str,
    pub synchronous_standby_names: &'a str,
    pub standbys: Vec<&'a Standby>,
    pub details_visible: bool,
    pub in_recovery: bool,
}

/// `synchronous_commit` levels at which a commit waits for a synchronous standby.
const WAITING_LEVELS: [&str; 3] = ["on", "remote_write", "remote_apply"];

impl ReplicationStatus {
    /// Whether a commit acknowledged now is on a standby too: `synchronous_commit` waits for
    /// standbys, `synchronous_standby_names` names some and at least one is in sync now.
    pub fn synchronously_replicated(&self) -> bool {
        WAITING_LEVELS.contains(&self.synchronous_commit.as_str())
            && !self.synchronous_standby_names.trim().is_empty()
            && !self.sync_standbys.is_empty()
    }

    /// Whether every commit on this primary waits now for a synchronous standby that is not
    /// there: `synchronous_commit` waits, `synchronous_standby_names` names standbys and none of
    /// them is in sync (none this role could not see, either). PostgreSQL then holds each commit
    /// (the lease's renewals too) until one is, or until the setting changes.
    pub fn commits_blocked(&self) -> bool {
        !self.in_recovery
            && WAITING_LEVELS.contains(&self.synchronous_commit.as_str())
            && !self.synchronous_standby_names.trim().is_empty()
            && self.sync_standbys.is_empty()
            && self.hidden_standbys == 0
    }

    /// Why commits are not synchronously replicated, in one sentence; `None` when they are.
    pub fn why_not(&self) -> Option<String> {
        if self.synchronously_replicated() {
            return None;
        }
        Some(
            if !WAITING_LEVELS.contains(&self.synchronous_commit.as_str()) {
                format!(
                    "synchronous_commit is {:?}: commits do not wait for any standby",
                    self.synchronous_commit
                )
            } else if self.synchronous_standby_names.trim().is_empty() {
                "synchronous_standby_names is empty: commits do not wait for any standby"
                    .to_string()
            } else if !self.details_visible && self.hidden_standbys > 0 {
                format!(
                "{} standby(s) stream from the database but this role may not see whether they \
                 are in sync (grant it pg_monitor or pg_read_all_stats)",
                self.hidden_standbys
            )
            } else {
                format!(
                    "no standby named by synchronous_standby_names ({:?}) is in sync now",
                    self.synchronous_standby_names
                )
            },
        )
    }

    /// What `/health/database` and `leasehold status --json` show.
    pub fn view(&self) -> ReplicationView<'_> {
        ReplicationView {
            synchronous: self.synchronously_replicated(),
            why_not: self.why_not(),
            synchronous_commit: &self.synchronous_commit,
            synchronous_standby_names: &self.synchronous_standby_names,
            standbys: self.standbys().collect(),
            details_visible: self.details_visible,
            in_recovery: self.in_recovery,
        }
    }

    /// Every standby, synchronous first.
    pub fn standbys(&self) -> impl Iterator<Item = &Standby> {
        self.sync_standbys.iter().chain(self.async_standbys.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standby(sync_state: Option<&str>) -> Standby {
        Standby {
            application_name: Some("b".into()),
            state: sync_state.map(|_| "streaming".into()),
            sync_state: sync_state.map(str::to_string),
            flush_lag_ms: None,
            replay_lag_ms: None,
        }
    }

    fn status(commit: &str, names: &str, standbys: Vec<Standby>) -> ReplicationStatus {
        let hidden_standbys = standbys.iter().filter(|s| s.sync_state.is_none()).count();
        let (sync_standbys, async_standbys) = standbys.into_iter().partition(Standby::is_sync);
        ReplicationStatus {
            synchronous_commit: commit.into(),
            synchronous_standby_names: names.into(),
            sync_standbys,
            async_standbys,
            details_visible: hidden_standbys == 0,
            hidden_standbys,
            in_recovery: false,
        }
    }

    #[test]
    fn replicated_only_when_a_commit_waits_for_a_standby_in_sync() {
        assert!(status("on", "b", vec![standby(Some("sync"))]).synchronously_replicated());
        assert!(
            status("remote_apply", "ANY 1 (b)", vec![standby(Some("quorum"))])
                .synchronously_replicated()
        );
        for s in [
            status("local", "b", vec![standby(Some("sync"))]),
            status("off", "b", vec![standby(Some("sync"))]),
            status("on", "", vec![standby(Some("async"))]),
            status("on", "b", vec![standby(Some("potential"))]),
            status("on", "b", vec![]),
            status("on", "b", vec![standby(None)]),
        ] {
            assert!(!s.synchronously_replicated(), "{s:?}");
            assert!(s.why_not().is_some());
        }
    }

    #[test]
    fn commits_are_blocked_only_when_they_wait_for_named_standbys_none_in_sync() {
        for s in [
            status("on", "nosuch", vec![standby(Some("async"))]),
            status("remote_apply", "ANY 1 (a, b)", vec![]),
            status("on", "b", vec![standby(Some("potential"))]),
        ] {
            assert!(s.commits_blocked(), "{s:?}");
        }
        let mut on_a_standby = status("on", "b", vec![]);
        on_a_standby.in_recovery = true;
        for s in [
            status("on", "b", vec![standby(Some("sync"))]),
            status("on", "ANY 1 (a, b)", vec![standby(Some("quorum"))]),
            status("local", "b", vec![]),
            status("off", "b", vec![]),
            status("on", "", vec![]),
            status("on", " ", vec![standby(Some("async"))]),
            // Hidden from this role: not known, so not said.
            status("on", "b", vec![standby(None)]),
            on_a_standby,
        ] {
            assert!(!s.commits_blocked(), "{s:?}");
        }
    }

    #[test]
    fn hidden_standbys_are_said_to_be_hidden_not_guessed() {
        let s = status("on", "b", vec![standby(None)]);
        let why = s.why_not().expect("not replicated");
        assert!(why.contains("pg_monitor"), "{why}");
    }
}
