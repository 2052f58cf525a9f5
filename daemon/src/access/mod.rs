//! Who may open which volume over NBD: per-volume allow-lists of client certificate names and
//! source networks, a read-only flag, TLS-only marking and a connection limit. The rules live in
//! the config file (`[access.VOLUME]`) or are set through the admin socket; the handshake asks
//! [`AccessStore::decide`] for every export it names, lists or opens.

pub mod cert_names;
pub mod error;
pub mod policy;
pub mod store;

pub use error::AccessError;
pub use policy::{AccessPolicy, ClientAddr, ClientIdentity, Decision, NetworkRule};
pub use store::{AccessStore, PolicySource};
