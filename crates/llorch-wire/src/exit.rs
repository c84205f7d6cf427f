//! Exit codes of every llama-orch binary, declared once.
//!
//! Scripts, systemd (`RestartPreventExitStatus=`, `SuccessExitStatus=`) and pool-managerd (which
//! reads the provisioner's) tell failures apart by these numbers, so they are a stable format
//! like the other types of this crate. They follow sysexits.h; 10 to 13 are the provisioner's
//! verdicts on a model file. A binary uses only the codes that can happen in it; which do is
//! listed per binary in docs/CONFIGURATION.md.

/// A failure that no other code names (the CLI: the operation was refused or did not finish).
pub const FAILURE: i32 = 1;

/// The model file's sha256 is not the pinned one.
pub const SHA256_MISMATCH: i32 = 10;
/// The model file is not GGUF.
pub const NOT_GGUF: i32 = 11;
/// The model file ends before its header says it should.
pub const TRUNCATED: i32 = 12;
/// The model file's GGUF header is malformed.
pub const MALFORMED: i32 = 13;

/// Whether `code` is the provisioner's verdict that the model file itself is bad: starting the
/// pool again cannot help until the file or the pin changes.
pub fn is_model_fault(code: i32) -> bool {
    (SHA256_MISMATCH..=MALFORMED).contains(&code)
}

/// The command line or the configuration is invalid (`EX_USAGE`).
pub const USAGE: i32 = 64;
/// Input data is invalid, for example a model file the engine cannot load (`EX_DATAERR`).
pub const DATAERR: i32 = 65;
/// An input file is missing or unreadable (`EX_NOINPUT`).
pub const NOINPUT: i32 = 66;
/// A service or address cannot be reached or bound (`EX_UNAVAILABLE`).
pub const UNAVAILABLE: i32 = 69;
/// An internal error (`EX_SOFTWARE`).
pub const SOFTWARE: i32 = 70;
/// An output file cannot be created (`EX_CANTCREAT`).
pub const CANTCREAT: i32 = 73;
/// An input or output error (`EX_IOERR`).
pub const IOERR: i32 = 74;
/// A temporary failure: the same call may succeed later, e.g. a full queue (`EX_TEMPFAIL`).
pub const TEMPFAIL: i32 = 75;
/// The other side broke the protocol (`EX_PROTOCOL`).
pub const PROTOCOL: i32 = 76;
/// The credentials were refused (`EX_NOPERM`).
pub const NOPERM: i32 = 77;
/// The configuration cannot be met on this machine, e.g. a `gpu_only` model that does not fit
/// its GPUs (`EX_CONFIG`).
pub const CONFIG: i32 = 78;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_faults_are_the_provisioners_file_verdicts_only() {
        for code in [SHA256_MISMATCH, NOT_GGUF, TRUNCATED, MALFORMED] {
            assert!(is_model_fault(code), "{code}");
        }
        for code in [
            0,
            FAILURE,
            9,
            14,
            USAGE,
            NOINPUT,
            UNAVAILABLE,
            IOERR,
            CONFIG,
        ] {
            assert!(!is_model_fault(code), "{code}");
        }
    }
}
