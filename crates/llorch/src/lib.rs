//! The `llorch` command line's library: `demo` (the engine alone), `up` (the home profile
//! without systemd), `remote` (commands that talk to orchestratord) and `generate` (straight to
//! an engine socket).

pub mod demo;
pub mod generate;
pub mod remote;
pub mod up;
