//! The `llorch` command line. Today it talks to an engine socket directly (`generate`) and
//! runs a one-shot demo of the foundation (`demo`: stage the model, start an engine, stream an
//! answer, stop). The home-stack issue adds `up`, `chat`, `status` and `pools`, which talk to
//! orchestratord over HTTP.

pub mod demo;
pub mod generate;
