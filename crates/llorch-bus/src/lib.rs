//! D-Bus for the daemons (docs/DBUS.md): which bus to use (`--dbus`), owning a well-known name,
//! who may call a mutating method, the object path label of an id, and the error replies.
//!
//! Authorization of a mutating call, in order: the caller's uid comes from the bus daemon
//! (`GetConnectionUnixUser`, which the caller cannot forge); root and the daemon's own user
//! are allowed (systemd's services do the same before asking polkit); anyone else is asked of
//! polkit for the action [`MANAGE_ACTION`] (`org.llamaorch.manage`: by default active local
//! admins, and members of the group `llama-orch-admin` through the shipped rule). Without
//! polkit on the bus (a private bus, a container without polkitd), only root and the daemon's
//! user are allowed. Every refusal is logged with the caller's uid.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use zbus::message::Header;
use zbus::names::{ErrorName, OwnedErrorName};
use zbus::zvariant::Value;

/// orchestratord's well-known name, object path and interface.
pub const ORCHESTRATOR: &str = "org.llamaorch.Orchestrator1";
pub const ORCHESTRATOR_PATH: &str = "/org/llamaorch/Orchestrator1";
/// pool-managerd's well-known name, the manager object and interface.
pub const POOL_MANAGER: &str = "org.llamaorch.PoolManager1";
pub const POOL_MANAGER_PATH: &str = "/org/llamaorch/PoolManager1";
/// The interface of each pool object, at `/org/llamaorch/PoolManager1/pool/<label>`.
pub const POOL_INTERFACE: &str = "org.llamaorch.PoolManager1.Pool";
/// The polkit action that guards every mutating method.
pub const MANAGE_ACTION: &str = "org.llamaorch.manage";
/// Error replies of our own are `org.llamaorch.Error.<Code>`.
pub const ERROR_PREFIX: &str = "org.llamaorch.Error";
/// Changed properties are compared and announced at most this often, in one
/// `PropertiesChanged` per object: a busy queue costs at most four signals a second.
pub const PROPERTY_PERIOD: std::time::Duration = std::time::Duration::from_millis(250);

/// Emits one `PropertiesChanged` for `interface` at `path` with `changed` (nothing when empty).
pub async fn properties_changed(
    conn: &zbus::Connection,
    path: &str,
    interface: &'static str,
    changed: &HashMap<&'static str, Value<'static>>,
) -> zbus::Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let emitter = zbus::object_server::SignalEmitter::new(conn, path)?;
    zbus::fdo::Properties::properties_changed(
        &emitter,
        zbus::names::InterfaceName::from_static_str(interface)?,
        changed.iter().map(|(k, v)| (*k, v.clone())).collect(),
        std::borrow::Cow::Borrowed(&[]),
    )
    .await
}

/// Which bus a daemon offers its interface on (`--dbus`, `LLORCH_DBUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The system bus when the daemon can own its name there; otherwise none, said once.
    #[default]
    Auto,
    /// The system bus (`DBUS_SYSTEM_BUS_ADDRESS` or the standard socket); failing is fatal.
    System,
    /// The session bus (`DBUS_SESSION_BUS_ADDRESS`); failing is fatal.
    Session,
    /// No D-Bus.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "system" => Ok(Self::System),
            "session" => Ok(Self::Session),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown D-Bus mode {other:?}: use auto, system, session or off"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::System => "system",
            Self::Session => "session",
            Self::Off => "off",
        })
    }
}

/// Connects to the bus `mode` names, lets `setup` add the objects, and owns `name` (objects
/// first, so nobody sees the name without them). `Ok(None)`: no D-Bus, and the log said why
/// once. `Err`: an explicit `system` or `session` that cannot be had (the caller exits).
pub async fn serve<F>(
    mode: Mode,
    name: &'static str,
    setup: F,
) -> Result<Option<zbus::Connection>, String>
where
    F: FnOnce(
        zbus::connection::Builder<'static>,
    ) -> zbus::Result<zbus::connection::Builder<'static>>,
{
    let builder = match mode {
        Mode::Off => {
            tracing::info!("D-Bus is off (--dbus off): {name} is not offered; operate with HTTP.");
            return Ok(None);
        }
        Mode::Auto | Mode::System => zbus::connection::Builder::system(),
        Mode::Session => zbus::connection::Builder::session(),
    };
    let result = async {
        let builder = setup(builder?)?;
        builder.name(name)?.build().await
    }
    .await;
    match result {
        Ok(conn) => {
            tracing::info!(bus = %mode, name, unique_name = ?conn.unique_name().map(|n| n.to_string()), "Serving on D-Bus.");
            Ok(Some(conn))
        }
        Err(e) if mode == Mode::Auto => {
            tracing::info!(
                error = %e,
                "Not on D-Bus: cannot own {name} on the system bus ({e}); operate with HTTP, or choose a bus with --dbus."
            );
            Ok(None)
        }
        Err(e) => Err(format!("cannot own {name} on the {mode} bus: {e}")),
    }
}

/// Who called a method: the uid the bus daemon vouches for, and the connection's unique name.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub sender: String,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} on D-Bus ({})", self.uid, self.sender)
    }
}

#[zbus::proxy(
    interface = "org.freedesktop.PolicyKit1.Authority",
    default_service = "org.freedesktop.PolicyKit1",
    default_path = "/org/freedesktop/PolicyKit1/Authority"
)]
trait Authority {
    #[allow(clippy::type_complexity)]
    fn check_authorization(
        &self,
        subject: &(&str, HashMap<&str, Value<'_>>),
        action_id: &str,
        details: HashMap<&str, &str>,
        flags: u32,
        cancellation_id: &str,
    ) -> zbus::Result<(bool, bool, HashMap<String, String>)>;
}

/// The caller of a method, who may use the mutating method `method` (see the module's rules),
/// or `AccessDenied` (logged with the caller's uid).
pub async fn authorize(
    conn: &zbus::Connection,
    hdr: &Header<'_>,
    method: &str,
) -> Result<Caller, BusError> {
    let Some(sender) = hdr.sender() else {
        return Err(BusError::access_denied(
            "the call has no sender; call through a bus",
        ));
    };
    let sender = sender.to_string();
    let uid = async {
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| e.to_string())?;
        let name = zbus::names::BusName::try_from(sender.as_str()).map_err(|e| e.to_string())?;
        dbus.get_connection_unix_user(name)
            .await
            .map_err(|e| e.to_string())
    }
    .await
    .map_err(|e| BusError::failed(format!("cannot learn who the caller is: {e}")))?;
    let caller = Caller { uid, sender };
    let own = llorch_os::process::euid();
    if uid == 0 || uid == own {
        return Ok(caller);
    }
    let interactive = hdr
        .primary()
        .flags()
        .contains(zbus::message::Flags::AllowInteractiveAuth);
    let verdict = async {
        let authority = AuthorityProxy::new(conn).await?;
        let subject = (
            "system-bus-name",
            HashMap::from([("name", Value::from(caller.sender.as_str()))]),
        );
        authority
            .check_authorization(
                &subject,
                MANAGE_ACTION,
                HashMap::from([("method", method)]),
                u32::from(interactive),
                "",
            )
            .await
    }
    .await;
    let why = match verdict {
        Ok((true, _, _)) => {
            tracing::info!(uid, sender = %caller.sender, method, "polkit allowed a D-Bus call.");
            return Ok(caller);
        }
        Ok((false, true, _)) => format!(
            "{method} needs {MANAGE_ACTION}, and polkit wants you to authenticate: call it with interactive authorization (busctl does), or as root"
        ),
        Ok((false, false, _)) => format!(
            "{method} needs polkit's {MANAGE_ACTION}, which uid {uid} does not have: call it as root, or join the group llama-orch-admin"
        ),
        Err(e) => format!(
            "{method} needs polkit's {MANAGE_ACTION}, and polkit cannot be asked ({e}): only root and uid {own} may call it on this bus"
        ),
    };
    tracing::warn!(
        message_id = llorch_os::message_id::DBUS_REFUSED,
        uid,
        sender = %caller.sender,
        method,
        "Refused a D-Bus call: {why}"
    );
    Err(BusError::access_denied(why))
}

/// An error reply: a D-Bus error name and a message for the operator.
#[derive(Debug, Clone)]
pub struct BusError {
    name: OwnedErrorName,
    message: String,
}

impl BusError {
    /// `org.freedesktop.DBus.Error.AccessDenied`.
    pub fn access_denied(message: impl Into<String>) -> Self {
        Self::named("org.freedesktop.DBus.Error.AccessDenied", message)
    }

    /// `org.freedesktop.DBus.Error.Failed`.
    pub fn failed(message: impl Into<String>) -> Self {
        Self::named("org.freedesktop.DBus.Error.Failed", message)
    }

    /// `org.llamaorch.Error.<code>`, `code` in CamelCase (`NotFound`, `NodeUnavailable`).
    pub fn code(code: &str, message: impl Into<String>) -> Self {
        Self::named(&format!("{ERROR_PREFIX}.{code}"), message)
    }

    fn named(name: &str, message: impl Into<String>) -> Self {
        let name = OwnedErrorName::try_from(name.to_string()).unwrap_or_else(|_| {
            OwnedErrorName::from(ErrorName::from_static_str_unchecked(
                "org.freedesktop.DBus.Error.Failed",
            ))
        });
        Self {
            name,
            message: message.into(),
        }
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for BusError {}

impl From<zbus::Error> for BusError {
    fn from(e: zbus::Error) -> Self {
        Self::failed(e.to_string())
    }
}

impl zbus::DBusError for BusError {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<zbus::message::Message> {
        zbus::message::Message::error(call, self.name.as_ref())?.build(&(self.message.as_str(),))
    }

    fn name(&self) -> ErrorName<'_> {
        self.name.as_ref()
    }

    fn description(&self) -> Option<&str> {
        Some(&self.message)
    }
}

/// The object path label of an id, as systemd's `sd_bus_path_encode` writes it: ASCII letters
/// and digits stay, every other byte is `_` and two lowercase hex digits, and the empty id is
/// `_`. `default` stays `default`; `gpu-0.a` is `gpu_2d0_2ea`.
pub fn path_label(id: &str) -> String {
    if id.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_valid_path_elements_and_distinct() {
        assert_eq!(path_label("default"), "default");
        assert_eq!(path_label("gpu-0.a"), "gpu_2d0_2ea");
        assert_eq!(path_label("a_b"), "a_5fb");
        assert_eq!(path_label(""), "_");
        // `_` is escaped too, so no two ids share a label.
        assert_ne!(path_label("a-"), path_label("a_2d"));
        for id in ["x", "a.b-c_d", "ünï", "0"] {
            let path = format!("{POOL_MANAGER_PATH}/pool/{}", path_label(id));
            assert!(
                zbus::zvariant::ObjectPath::try_from(path.as_str()).is_ok(),
                "{path}"
            );
        }
    }

    #[test]
    fn modes_parse_and_name_the_choices_when_wrong() {
        for m in ["auto", "system", "session", "off"] {
            assert_eq!(m.parse::<Mode>().unwrap().to_string(), m);
        }
        let e = "bus".parse::<Mode>().unwrap_err();
        assert!(e.contains("auto, system, session or off"), "{e}");
    }

    #[test]
    fn errors_carry_their_names() {
        use zbus::DBusError;
        assert_eq!(
            BusError::code("NotFound", "x").name().as_str(),
            "org.llamaorch.Error.NotFound"
        );
        assert_eq!(
            BusError::access_denied("no").name().as_str(),
            "org.freedesktop.DBus.Error.AccessDenied"
        );
        assert_eq!(
            BusError::code("Not Valid", "x").name().as_str(),
            "org.freedesktop.DBus.Error.Failed"
        );
    }
}
