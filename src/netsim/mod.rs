//! Network impairment simulation: one seeded model, two uses.
//!
//! - [`model`]: the pure, seeded impairment model of one link direction ([`LinkModel`]): loss,
//!   Gilbert-Elliott burst loss, delay, jitter, reordering, duplication, a rate cap with a
//!   drop-tail queue, and a partition switch. Also the flag parsers ([`parse_percent`],
//!   [`parse_rate`], [`parse_duration`], [`parse_burst`]) shared by the tools.
//! - [`socket`]: an in-memory UDP switch ([`SimNetwork`]) whose sockets implement
//!   [`quinn::AsyncUdpSocket`], for deterministic tests under tokio's paused clock
//!   ([`sim_endpoint`]).
//! - [`forwarder`]: a UDP forwarder applying the model between real sockets, the core of
//!   `examples/lossy_link.rs`, for load tests.
//! - `delay_queue`: the datagrams in flight, by delivery time, for both of them.
//!
//! See `docs/NETSIM.md`.

mod delay_queue;
pub mod forwarder;
pub mod model;
pub mod socket;

pub use forwarder::{Direction, Forwarder, ForwarderControl, ForwarderStats};
pub use model::{
    format_rate, parse_burst, parse_duration, parse_percent, parse_rate, DropReason, GilbertElliott, Impairment,
    LinkModel, LinkStats, Verdict,
};
pub use socket::{sim_endpoint, SimNetwork, SimSocket};
