//! The end-to-end suite as one test binary: each module was a binary of its own, and each of
//! them linked the whole workspace; now it is linked once. Shared set-up is in [`helpers`]; the
//! cluster itself is `leasehold_testkit::cluster`.

mod helpers;

mod alerting;
mod broker;
mod chaos;
mod cluster_config;
mod components;
mod corpus;
mod dbfailover;
mod deploy;
mod doctor;
mod failover;
mod formats;
mod generated;
mod identity;
mod ingest;
mod isolation;
mod memory;
mod operations;
mod optimistic;
mod ordinary;
mod partitions;
mod retention;
mod review10;
mod review13;
mod review18;
mod review21;
mod routes;
mod routes_checks;
mod routes_failover;
mod routes_review;
mod secrets;
mod sparkplug;
mod subscriptions;
mod tls;
