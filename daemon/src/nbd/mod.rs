//! The NBD side: listeners, connections, and the path of a request from socket to reply.

pub mod catalog;
pub mod connection;
mod drain;
pub mod handshake;
mod idle;
mod in_place;
mod payload_wait;
pub mod replies;
mod send_queue;
mod sendfile;
pub mod server;
pub mod shutdown;
pub mod stream;
pub mod tcp_congestion;
pub mod threads;
pub mod tls;
pub mod transmission;
mod unix_buffer;
