//! The link between the primary and its replicas, simulated in process or by `lossy_link`
//! forwarders on UDP: how a partition is switched and what the link did.

use std::net::SocketAddr;
use std::time::Duration;

use walship::netsim::{self, Impairment, SimNetwork};

use crate::Args;

/// Starts a `lossy_link` forwarder to `upstream` on 127.0.0.1 for replica `name` (seeded from
/// `seed` and the name), adds its control to `controls` and returns the address to dial.
pub fn start_forwarder(
    upstream: SocketAddr,
    imp: Impairment,
    seed: u64,
    name: &str,
    controls: &mut Vec<netsim::forwarder::ForwarderControl>,
) -> std::io::Result<SocketAddr> {
    let fwd = netsim::forwarder::Forwarder::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        upstream,
        imp,
        imp,
        netsim::model::derive_seed(seed, name.as_bytes()),
    )?;
    controls.push(fwd.control());
    let addr = fwd.local_addr();
    tokio::spawn(fwd.run(std::future::pending::<()>()));
    Ok(addr)
}

/// The link: how a partition is switched on and off.
pub enum Link {
    Sim(SimNetwork),
    Udp(Vec<netsim::forwarder::ForwarderControl>),
}

/// How long a loop that polls every `step` may sleep at `elapsed` so as to wake at the next
/// partition switch (`--partition-at`, then its end), not up to a step after it: a partition
/// shorter than a step would otherwise be missed or stretched.
pub fn nap_before_partition_switch(args: &Args, elapsed: Duration, step: Duration) -> Duration {
    let Some(at) = args.partition_at else { return step };
    let next = [at, at + args.partition_for].into_iter().find(|t| *t > elapsed);
    next.map_or(step, |t| (t - elapsed).clamp(Duration::from_millis(1), step))
}

impl Link {
    /// Cuts or heals the link as `--partition-at/--partition-for` say at `elapsed`; returns the
    /// line to print when that changed it.
    pub fn follow_partition(&self, args: &Args, elapsed: Duration, partitioned: &mut bool) -> Option<String> {
        let at = args.partition_at?;
        let want = elapsed >= at && elapsed < at + args.partition_for;
        if want == *partitioned {
            return None;
        }
        self.partition(want);
        *partitioned = want;
        Some(format!("[{:>6.1}s] link {}", elapsed.as_secs_f64(), if want { "partitioned" } else { "healed" }))
    }

    pub fn partition(&self, on: bool) {
        match self {
            Link::Sim(net) => net.partition_all(on),
            Link::Udp(ctls) => ctls.iter().for_each(|c| c.set_partitioned(on)),
        }
    }

    pub fn stats(&self) -> netsim::LinkStats {
        match self {
            Link::Sim(net) => net.stats(),
            Link::Udp(ctls) => {
                let mut all = netsim::LinkStats::default();
                for c in ctls {
                    let s = c.stats();
                    all.merge(&s.up);
                    all.merge(&s.down);
                }
                all
            }
        }
    }
}
