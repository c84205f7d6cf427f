//! What the benches share, all from the test support crate (`llorch-tests`): settings from
//! the environment, order statistics and the machine's load (`bench`), binaries, the model and
//! free ports.
#![allow(dead_code, unused_imports)] // Each bench uses its own subset.

pub use llorch_tests::bench::{env_or, loadavg, median, quantile};
pub use llorch_tests::stack::{free_port, terminate};
pub use llorch_tests::{bin, model_path};
