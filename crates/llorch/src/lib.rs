//! The `llorch` command line's library: `demo` (the engine alone), `up` (the home profile
//! without systemd), `remote` (commands that talk to orchestratord), `bus` (the same over
//! D-Bus, for local control) and `generate` (straight to an engine socket); [`exit`]: the exit
//! code of a failed command.

pub mod bus;
pub mod demo;
pub mod exit;
pub mod generate;
pub mod remote;
pub mod up;
