//! The impairment model of one link direction: pure, seeded, no I/O.
//!
//! [`LinkModel::on_packet`] decides the fate of each packet offered to the link: dropped (and
//! why), or delivered after some delay, possibly twice. The caller (the in-process switch of
//! [`super::socket`] or the UDP forwarder of [`super::forwarder`]) does the actual delivery.
//!
//! Impairments are applied in this order (see [`LinkModel::on_packet`]):
//!
//! 1. partition switch: drops everything while on;
//! 2. Gilbert-Elliott burst loss: the chain takes one step, then the packet is lost with the
//!    loss probability of the new state;
//! 3. independent loss;
//! 4. rate cap: the packet joins a drop-tail serialization queue (dropped if the queue is full);
//! 5. delay + jitter (uniform in `0..=jitter`; jitter alone may reorder packets, as in netem,
//!    which [`LinkStats::overtaking`] counts);
//! 6. reorder: the packet is held back an extra `delay / 2 + jitter + 5 ms`;
//! 7. duplicate: a second copy is delivered right after the original.
//!
//! Dropped packets (steps 1-4) do not use the link's bandwidth, as in netem.

use std::fmt;
use std::time::{Duration, Instant};

/// Extra hold of a reordered packet on top of `delay / 2 + jitter` (so that packets sent a
/// little later overtake it even on a link without delay).
pub const REORDER_EXTRA_HOLD: Duration = Duration::from_millis(5);

/// Burst loss as a two-state Markov chain (Gilbert-Elliott). Each packet first moves the chain
/// (good -> bad with `p_good_to_bad`, bad -> good with `p_bad_to_good`), then is lost with the
/// loss probability of the state it is in. The chain starts in the good state.
///
/// A classic bursty link: `p_good_to_bad = 0.01, p_bad_to_good = 0.3, loss_in_good = 0,
/// loss_in_bad = 0.5`: bad periods last 1 / 0.3 ≈ 3.3 packets on average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GilbertElliott {
    /// Probability, per packet, of going from the good to the bad state.
    pub p_good_to_bad: f64,
    /// Probability, per packet, of going from the bad to the good state.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state (often 0).
    pub loss_in_good: f64,
    /// Loss probability in the bad state (often 0.5 to 1).
    pub loss_in_bad: f64,
}

impl GilbertElliott {
    /// Long-run fraction of packets that find the chain in the bad state.
    pub fn stationary_bad(&self) -> f64 {
        let sum = self.p_good_to_bad + self.p_bad_to_good;
        if sum <= 0.0 {
            0.0
        } else {
            self.p_good_to_bad / sum
        }
    }

    /// Long-run loss rate caused by the chain alone.
    pub fn mean_loss(&self) -> f64 {
        let bad = self.stationary_bad();
        bad * self.loss_in_bad + (1.0 - bad) * self.loss_in_good
    }

    /// Mean number of consecutive packets spent in the bad state (`1 / p_bad_to_good`).
    pub fn mean_bad_run(&self) -> f64 {
        if self.p_bad_to_good <= 0.0 {
            f64::INFINITY
        } else {
            1.0 / self.p_bad_to_good
        }
    }

    fn validate(&self) -> Result<(), String> {
        check_probability("burst p_good_to_bad", self.p_good_to_bad)?;
        check_probability("burst p_bad_to_good", self.p_bad_to_good)?;
        check_probability("burst loss_in_good", self.loss_in_good)?;
        check_probability("burst loss_in_bad", self.loss_in_bad)
    }
}

impl fmt::Display for GilbertElliott {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "burst(g->b {}, b->g {}, loss good {}, loss bad {})",
            pct(self.p_good_to_bad),
            pct(self.p_bad_to_good),
            pct(self.loss_in_good),
            pct(self.loss_in_bad)
        )
    }
}

/// The impairments of one link direction. [`Default`] is a perfect link (no loss, no delay,
/// unlimited rate). Probabilities are in `0..=1`; out-of-range values are clamped by the model
/// ([`Impairment::validate`] reports them).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// Independent loss probability per packet.
    pub loss: f64,
    /// Burst loss, applied in addition to (before) `loss`.
    pub burst: Option<GilbertElliott>,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per packet. Packets whose delays differ by
    /// more than their spacing arrive out of order (like netem).
    pub jitter: Duration,
    /// Probability that a packet is held back an extra `delay / 2 + jitter + 5 ms`
    /// ([`REORDER_EXTRA_HOLD`]) so that later packets overtake it.
    pub reorder: f64,
    /// Probability that a packet is delivered twice.
    pub duplicate: f64,
    /// Bandwidth cap in bytes per second (`None`: unlimited). Packets are serialized one after
    /// the other; a packet waits for those ahead of it in the queue.
    pub rate_bytes_per_s: Option<u64>,
    /// Capacity of the rate queue in bytes (drop-tail): a packet that would make the bytes
    /// waiting ahead of it plus itself exceed this is dropped. `None`: one second at
    /// `rate_bytes_per_s`. Ignored without a rate cap.
    pub queue_limit_bytes: Option<u64>,
}

impl Impairment {
    /// A perfect link.
    pub fn perfect() -> Impairment {
        Impairment::default()
    }

    /// Whether this is a perfect link (nothing is ever dropped, delayed or duplicated).
    pub fn is_perfect(&self) -> bool {
        *self == Impairment::default()
    }

    /// Checks that probabilities are in `0..=1` and that a rate cap is non-zero.
    pub fn validate(&self) -> Result<(), String> {
        check_probability("loss", self.loss)?;
        check_probability("reorder", self.reorder)?;
        check_probability("duplicate", self.duplicate)?;
        if let Some(b) = &self.burst {
            b.validate()?;
        }
        if self.rate_bytes_per_s == Some(0) {
            return Err("rate must be > 0 bytes/s (use None for unlimited)".into());
        }
        if self.queue_limit_bytes == Some(0) {
            return Err("queue limit must be > 0 bytes".into());
        }
        Ok(())
    }

    /// The drop-tail capacity of the rate queue in bytes, if there is a rate cap.
    pub fn queue_capacity(&self) -> Option<u64> {
        self.rate_bytes_per_s.map(|rate| self.queue_limit_bytes.unwrap_or(rate))
    }
}

impl fmt::Display for Impairment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_perfect() {
            return f.write_str("perfect");
        }
        let mut parts = Vec::new();
        if self.loss > 0.0 {
            parts.push(format!("loss {}", pct(self.loss)));
        }
        if let Some(b) = &self.burst {
            parts.push(b.to_string());
        }
        if !self.delay.is_zero() {
            parts.push(format!("delay {:?}", self.delay));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter {:?}", self.jitter));
        }
        if self.reorder > 0.0 {
            parts.push(format!("reorder {}", pct(self.reorder)));
        }
        if self.duplicate > 0.0 {
            parts.push(format!("duplicate {}", pct(self.duplicate)));
        }
        if let Some(rate) = self.rate_bytes_per_s {
            parts.push(format!("rate {}", format_rate(rate)));
            if let Some(q) = self.queue_capacity() {
                parts.push(format!("queue {q} B"));
            }
        }
        f.write_str(&parts.join(", "))
    }
}

fn check_probability(what: &str, p: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(format!("{what} must be a probability in 0..=1, got {p}"))
    }
}

fn pct(p: f64) -> String {
    format!("{}%", (p * 100.0 * 1e6).round() / 1e6)
}

/// A rate in bytes/s as Mbit/s (or kbit/s), for reports.
pub fn format_rate(bytes_per_s: u64) -> String {
    let bits = bytes_per_s as f64 * 8.0;
    if bits >= 1e9 {
        format!("{}gbit", (bits / 1e9 * 1000.0).round() / 1000.0)
    } else if bits >= 1e6 {
        format!("{}mbit", (bits / 1e6 * 1000.0).round() / 1000.0)
    } else {
        format!("{}kbit", (bits / 1e3 * 1000.0).round() / 1000.0)
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Independent loss ([`Impairment::loss`]).
    Loss,
    /// Gilbert-Elliott burst loss ([`Impairment::burst`]).
    Burst,
    /// The link is partitioned.
    Partition,
    /// The rate queue is full (drop-tail).
    Queue,
}

/// The fate of one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver the packet `delay` from now, and a second copy `duplicate` from now if set.
    Deliver {
        delay: Duration,
        duplicate: Option<Duration>,
        /// The packet was picked for reordering (held back).
        reordered: bool,
    },
    /// Drop the packet.
    Drop(DropReason),
}

impl Verdict {
    /// The delivery delays: none if dropped, one, or two if duplicated.
    pub fn deliveries(&self) -> impl Iterator<Item = Duration> {
        let (a, b) = match *self {
            Verdict::Deliver { delay, duplicate, .. } => (Some(delay), duplicate),
            Verdict::Drop(_) => (None, None),
        };
        a.into_iter().chain(b)
    }

    /// Whether the packet is dropped.
    pub fn is_drop(&self) -> bool {
        matches!(self, Verdict::Drop(_))
    }
}

/// Counters of one link direction (or a sum of several, see [`LinkStats::merge`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets offered to the link.
    pub packets: u64,
    /// Bytes offered to the link.
    pub bytes: u64,
    /// Packets the model let through (originals; duplicates are counted in `duplicated`).
    pub forwarded: u64,
    /// Bytes of `forwarded`.
    pub forwarded_bytes: u64,
    /// Dropped by independent loss.
    pub dropped_loss: u64,
    /// Dropped by burst loss.
    pub dropped_burst: u64,
    /// Dropped by the partition switch.
    pub dropped_partition: u64,
    /// Dropped because the rate queue was full.
    pub dropped_queue: u64,
    /// Packets delivered twice.
    pub duplicated: u64,
    /// Packets held back for reordering.
    pub reordered: u64,
    /// Packets delivered before a packet offered earlier: those `reordered` holds back are
    /// overtaken, and jitter larger than the packets' spacing reorders many more on its own.
    pub overtaking: u64,
    /// Packets that had to wait behind others in the rate queue.
    pub queued: u64,
    /// Packets (copies) the model let through that could not be handed over: no socket at the
    /// destination, its receive queue full, or a send error (recorded by the user of the model
    /// with [`LinkModel::record_undeliverable`]).
    pub undeliverable: u64,
}

impl LinkStats {
    /// Packets dropped by the model, all reasons.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_burst + self.dropped_partition + self.dropped_queue
    }

    /// Drops counted for `reason`.
    pub fn dropped_by(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Loss => self.dropped_loss,
            DropReason::Burst => self.dropped_burst,
            DropReason::Partition => self.dropped_partition,
            DropReason::Queue => self.dropped_queue,
        }
    }

    /// Adds `other`'s counters to these.
    pub fn merge(&mut self, other: &LinkStats) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.forwarded += other.forwarded;
        self.forwarded_bytes += other.forwarded_bytes;
        self.dropped_loss += other.dropped_loss;
        self.dropped_burst += other.dropped_burst;
        self.dropped_partition += other.dropped_partition;
        self.dropped_queue += other.dropped_queue;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.overtaking += other.overtaking;
        self.queued += other.queued;
        self.undeliverable += other.undeliverable;
    }
}

impl fmt::Display for LinkStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pkts ({} B) in, {} forwarded ({} B), {} dropped (loss {}, burst {}, partition {}, queue {}), \
             {} duplicated, {} reordered ({} overtook an earlier packet), {} queued, {} undeliverable",
            self.packets,
            self.bytes,
            self.forwarded,
            self.forwarded_bytes,
            self.dropped(),
            self.dropped_loss,
            self.dropped_burst,
            self.dropped_partition,
            self.dropped_queue,
            self.duplicated,
            self.reordered,
            self.overtaking,
            self.queued,
            self.undeliverable
        )
    }
}

/// A small seeded PRNG (SplitMix64): fast, 64-bit state, good enough for simulations, fully
/// reproducible across platforms.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed` (any value, including 0).
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`. `p <= 0` (or NaN) is never and `p >= 1` always, without
    /// drawing a number, so disabled impairments do not consume randomness.
    pub fn chance(&mut self, p: f64) -> bool {
        if p.is_nan() || p <= 0.0 {
            false
        } else if p >= 1.0 {
            true
        } else {
            self.next_f64() < p
        }
    }

    /// Uniform in `0..=max` (Lemire's multiply-shift; the tiny bias is irrelevant here).
    pub fn up_to(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        if max == u64::MAX {
            return self.next_u64();
        }
        ((self.next_u64() as u128 * (max as u128 + 1)) >> 64) as u64
    }
}

/// The SplitMix64 finalizer: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives an independent seed from `seed` and a label (e.g. the bytes of a link's addresses),
/// stable across platforms and runs.
pub fn derive_seed(seed: u64, label: &[u8]) -> u64 {
    let mut h = mix64(seed ^ 0x6E65_7473_696D_2D31);
    for chunk in label.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix64(h ^ u64::from_le_bytes(word)).wrapping_add(chunk.len() as u64);
    }
    mix64(h ^ label.len() as u64)
}

/// One direction of a link: an [`Impairment`], a seeded PRNG and the state the impairments need
/// (Gilbert-Elliott state, rate-queue horizon, partition switch), plus counters.
///
/// Same impairment, same seed and the same sequence of `on_packet(now, len)` calls give the same
/// verdicts.
#[derive(Debug, Clone)]
pub struct LinkModel {
    imp: Impairment,
    rng: SplitMix64,
    ge_bad: bool,
    partitioned: bool,
    /// When the rate queue has finished serializing every accepted packet.
    horizon: Option<Instant>,
    /// The latest delivery time given so far, to count packets that overtake.
    latest_delivery: Option<Instant>,
    stats: LinkStats,
}

impl LinkModel {
    /// A link applying `imp`, its randomness seeded with `seed`.
    pub fn new(imp: Impairment, seed: u64) -> LinkModel {
        LinkModel {
            imp,
            rng: SplitMix64::new(derive_seed(seed, b"link")),
            ge_bad: false,
            partitioned: false,
            horizon: None,
            latest_delivery: None,
            stats: LinkStats::default(),
        }
    }

    /// The impairment applied.
    pub fn impairment(&self) -> &Impairment {
        &self.imp
    }

    /// Changes the impairment from now on, keeping the PRNG, counters, partition switch and
    /// queue (packets already accepted keep their delivery times).
    pub fn set_impairment(&mut self, imp: Impairment) {
        self.imp = imp;
        if imp.burst.is_none() {
            self.ge_bad = false;
        }
    }

    /// Turns the partition switch on (every packet is dropped) or off.
    pub fn set_partitioned(&mut self, on: bool) {
        self.partitioned = on;
    }

    /// Whether the partition switch is on.
    pub fn is_partitioned(&self) -> bool {
        self.partitioned
    }

    /// The counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Counts a packet the model let through that could not be handed over (see
    /// [`LinkStats::undeliverable`]).
    pub fn record_undeliverable(&mut self) {
        self.stats.undeliverable += 1;
    }

    /// How long a packet offered at `now` would wait in the rate queue before its own
    /// serialization starts (zero without a rate cap).
    pub fn queue_backlog(&self, now: Instant) -> Duration {
        self.horizon.map_or(Duration::ZERO, |h| h.saturating_duration_since(now))
    }

    /// Decides the fate of a packet of `len` bytes offered at `now`. Delays in the verdict are
    /// counted from `now`. `now` should not go backwards between calls (if it does, the rate
    /// queue treats it as the latest time seen).
    pub fn on_packet(&mut self, now: Instant, len: usize) -> Verdict {
        let imp = self.imp;
        self.stats.packets += 1;
        self.stats.bytes += len as u64;

        // 1. Partition.
        if self.partitioned {
            return self.drop(DropReason::Partition);
        }
        // 2. Burst loss: step the chain, then lose with the state's probability.
        if let Some(ge) = &imp.burst {
            if self.ge_bad {
                if self.rng.chance(ge.p_bad_to_good) {
                    self.ge_bad = false;
                }
            } else if self.rng.chance(ge.p_good_to_bad) {
                self.ge_bad = true;
            }
            let p = if self.ge_bad { ge.loss_in_bad } else { ge.loss_in_good };
            if self.rng.chance(p) {
                return self.drop(DropReason::Burst);
            }
        }
        // 3. Independent loss.
        if self.rng.chance(imp.loss) {
            return self.drop(DropReason::Loss);
        }
        // 4. Rate queue (drop-tail).
        let mut queue_delay = Duration::ZERO;
        let mut serialization = Duration::ZERO;
        if let Some(rate) = imp.rate_bytes_per_s.filter(|r| *r > 0) {
            let start = match self.horizon {
                Some(h) if h > now => h,
                _ => now,
            };
            let backlog = start - now;
            let backlog_bytes = (backlog.as_nanos() * rate as u128 / 1_000_000_000) as u64;
            let capacity = imp.queue_capacity().unwrap_or(rate);
            if !backlog.is_zero() && backlog_bytes + len as u64 > capacity {
                return self.drop(DropReason::Queue);
            }
            if !backlog.is_zero() {
                self.stats.queued += 1;
            }
            serialization = serialization_time(len, rate);
            let done = start + serialization;
            self.horizon = Some(done);
            queue_delay = done - now;
        }
        // 5. Delay and jitter.
        let jitter = Duration::from_nanos(self.rng.up_to(duration_nanos(imp.jitter)));
        let mut delay = queue_delay.saturating_add(imp.delay).saturating_add(jitter);
        // 6. Reorder: hold this packet back so later ones overtake it.
        let reordered = self.rng.chance(imp.reorder);
        if reordered {
            delay = delay.saturating_add((imp.delay / 2).saturating_add(imp.jitter).saturating_add(REORDER_EXTRA_HOLD));
            self.stats.reordered += 1;
        }
        // 7. Duplicate: a second copy right after the original (after its own serialization
        // when rate-capped; the copy uses bandwidth too).
        let duplicate = if self.rng.chance(imp.duplicate) {
            self.stats.duplicated += 1;
            if let Some(h) = self.horizon.as_mut() {
                *h += serialization;
            }
            Some(delay.saturating_add(serialization))
        } else {
            None
        };
        let arrival = now + delay;
        match self.latest_delivery {
            Some(latest) if arrival < latest => self.stats.overtaking += 1,
            _ => self.latest_delivery = Some(arrival),
        }
        self.stats.forwarded += 1;
        self.stats.forwarded_bytes += len as u64;
        Verdict::Deliver { delay, duplicate, reordered }
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        match reason {
            DropReason::Loss => self.stats.dropped_loss += 1,
            DropReason::Burst => self.stats.dropped_burst += 1,
            DropReason::Partition => self.stats.dropped_partition += 1,
            DropReason::Queue => self.stats.dropped_queue += 1,
        }
        Verdict::Drop(reason)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Time to put `len` bytes on a link of `rate` bytes/s (rounded up to the nanosecond).
pub fn serialization_time(len: usize, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    let nanos = (len as u128 * 1_000_000_000).div_ceil(rate as u128);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers shared by the lossy_link example and load-test tools.

/// Parses a probability: `"2%"`, `"0.5%"` (percent, `0%..=100%`) or a fraction `"0.02"`
/// (`0..=1`).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n.trim(), 0.01),
        None => (t, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad probability {s:?}: use e.g. 2%, 0.5% or 0.02"))?;
    let p = v * scale;
    if !(0.0..=1.0).contains(&p) {
        return Err(if scale == 1.0 && v > 1.0 {
            format!("bad probability {s:?}: a fraction must be in 0..=1 (write {v}% for percent)")
        } else {
            format!("bad probability {s:?}: must be within 0%..=100%")
        });
    }
    Ok(p)
}

/// Parses a rate into bytes per second. Accepted forms (number may be fractional):
///
/// - bits per second, SI prefixes, case-insensitive: `500kbit`, `100mbit`, `1gbit`, `10tbit`,
///   `64000bit` (also with `/s`: `100mbit/s`);
/// - `b/s` with a lowercase `b` is bits: `100Mb/s`, `1Gb/s`, `500kb/s`;
/// - `B/s` with an uppercase `B` is bytes: `12.5MB/s`, `1GB/s`, `800kB/s`, `100B/s`; binary
///   prefixes `KiB/s`, `MiB/s`, `GiB/s`;
/// - a bare number is bytes per second: `1250000`.
///
/// `mbps`-style units are refused as ambiguous (tc reads `mbps` as megabytes, most people as
/// megabits): write `mbit` or `MB/s`.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = |why: &str| format!("bad rate {s:?}: {why} (use e.g. 100mbit, 1gbit, 500kbit, 12.5MB/s)");
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let v: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let lower = unit.to_ascii_lowercase();
    if lower.ends_with("bps") {
        return Err(bad("ambiguous unit (bits or bytes?): write mbit for bits/s or MB/s for bytes/s"));
    }
    let si = |p: &str| -> Option<f64> {
        match p {
            "" => Some(1.0),
            "k" | "K" => Some(1e3),
            "m" | "M" => Some(1e6),
            "g" | "G" => Some(1e9),
            "t" | "T" => Some(1e12),
            _ => None,
        }
    };
    let bytes_per_s = if unit.is_empty() {
        v
    } else if let Some(prefix) = lower.strip_suffix("bit/s").or_else(|| lower.strip_suffix("bit")) {
        v * si(prefix).ok_or_else(|| bad("unknown prefix"))? / 8.0
    } else if let Some(prefix) = unit.strip_suffix("iB/s") {
        let scale = match prefix {
            "K" | "k" => 1024.0,
            "M" => 1024.0 * 1024.0,
            "G" => 1024.0 * 1024.0 * 1024.0,
            _ => return Err(bad("unknown prefix")),
        };
        v * scale
    } else if let Some(prefix) = unit.strip_suffix("B/s") {
        v * si(prefix).ok_or_else(|| bad("unknown prefix"))?
    } else if let Some(prefix) = unit.strip_suffix("b/s") {
        v * si(prefix).ok_or_else(|| bad("unknown prefix"))? / 8.0
    } else {
        return Err(bad("unknown unit"));
    };
    if !bytes_per_s.is_finite() || bytes_per_s < 1.0 || bytes_per_s > u64::MAX as f64 {
        return Err(bad("must be at least 1 byte/s"));
    }
    Ok(bytes_per_s.round() as u64)
}

/// Parses a duration: `250ms`, `2s`, `1.5s`, `100us`, `500ns`, `2m` (minutes), or a bare
/// number of seconds (`30`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("bad duration {s:?}: use e.g. 250ms, 2s, 1.5s");
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ns") {
        (n, 1e-9)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if v.is_nan() || v < 0.0 {
        return Err(bad());
    }
    Duration::try_from_secs_f64(v * scale).map_err(|_| bad())
}

/// Parses Gilbert-Elliott parameters `P_GB,P_BG,LOSS_G,LOSS_B`, each a probability as
/// [`parse_percent`] accepts (e.g. `1%,30%,0%,50%`).
pub fn parse_burst(s: &str) -> Result<GilbertElliott, String> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != 4 {
        return Err(format!("bad burst {s:?}: expected P_GB,P_BG,LOSS_G,LOSS_B, e.g. 1%,30%,0%,50%"));
    }
    let p = |i: usize| parse_percent(parts[i]).map_err(|e| format!("bad burst {s:?}: {e}"));
    Ok(GilbertElliott { p_good_to_bad: p(0)?, p_bad_to_good: p(1)?, loss_in_good: p(2)?, loss_in_bad: p(3)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run(imp: Impairment, seed: u64, n: usize) -> (Vec<Verdict>, LinkStats) {
        let mut m = LinkModel::new(imp, seed);
        let t0 = Instant::now();
        let v = (0..n).map(|i| m.on_packet(t0 + Duration::from_micros(i as u64 * 100), 1200)).collect();
        (v, m.stats())
    }

    fn everything() -> Impairment {
        Impairment {
            loss: 0.05,
            burst: Some(GilbertElliott {
                p_good_to_bad: 0.01,
                p_bad_to_good: 0.3,
                loss_in_good: 0.0,
                loss_in_bad: 0.5,
            }),
            delay: 20 * MS,
            jitter: 5 * MS,
            reorder: 0.02,
            duplicate: 0.01,
            rate_bytes_per_s: Some(12_500_000),
            queue_limit_bytes: None,
        }
    }

    #[test]
    fn same_seed_same_verdicts() {
        let (a, sa) = run(everything(), 7, 20_000);
        let (b, sb) = run(everything(), 7, 20_000);
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        let (c, _) = run(everything(), 8, 20_000);
        assert_ne!(a, c, "a different seed should give different verdicts");
    }

    #[test]
    fn perfect_link_delivers_everything_immediately() {
        let (v, s) = run(Impairment::default(), 1, 1000);
        assert!(v.iter().all(|v| *v == Verdict::Deliver { delay: Duration::ZERO, duplicate: None, reordered: false }));
        assert_eq!(s.forwarded, 1000);
        assert_eq!(s.dropped(), 0);
    }

    #[test]
    fn loss_rate_matches_setting() {
        for &p in &[0.01, 0.05, 0.3] {
            let n = 100_000;
            let (_, s) = run(Impairment { loss: p, ..Default::default() }, 3, n);
            let rate = s.dropped_loss as f64 / n as f64;
            // 4 standard deviations of a binomial.
            let tol = 4.0 * (p * (1.0 - p) / n as f64).sqrt();
            assert!((rate - p).abs() < tol, "p {p}: measured {rate}, tolerance {tol}");
            assert_eq!(s.forwarded + s.dropped_loss, n as u64);
        }
    }

    #[test]
    fn gilbert_elliott_makes_bursts() {
        let ge = GilbertElliott { p_good_to_bad: 0.01, p_bad_to_good: 0.2, loss_in_good: 0.0, loss_in_bad: 0.9 };
        let n = 200_000;
        let (v, s) = run(Impairment { burst: Some(ge), ..Default::default() }, 11, n);
        let rate = s.dropped_burst as f64 / n as f64;
        assert!((rate - ge.mean_loss()).abs() < 0.01, "measured {rate}, expected {}", ge.mean_loss());
        // Mean run length of consecutive drops: independent loss at this rate would give ~1.04.
        let mut runs = Vec::new();
        let mut cur = 0u64;
        for x in &v {
            if x.is_drop() {
                cur += 1;
            } else if cur > 0 {
                runs.push(cur);
                cur = 0;
            }
        }
        let mean_run = runs.iter().sum::<u64>() as f64 / runs.len() as f64;
        assert!(mean_run > 2.5, "mean drop run {mean_run}");
        let independent = Impairment { loss: rate, ..Default::default() };
        let (v2, _) = run(independent, 11, n);
        let drops2 = v2.iter().filter(|v| v.is_drop()).count();
        let pairs2 = v2.windows(2).filter(|w| w[0].is_drop() && w[1].is_drop()).count();
        let pairs = v.windows(2).filter(|w| w[0].is_drop() && w[1].is_drop()).count();
        assert!(pairs > 10 * pairs2.max(1), "burst pairs {pairs} vs independent {pairs2} ({drops2} drops)");
    }

    #[test]
    fn duplicate_and_reorder_rates() {
        let n = 100_000;
        let imp = Impairment { duplicate: 0.01, reorder: 0.02, delay: 10 * MS, ..Default::default() };
        let (v, s) = run(imp, 5, n);
        let tol = |p: f64| 4.0 * (p * (1.0 - p) / n as f64).sqrt();
        let dup = s.duplicated as f64 / n as f64;
        let reo = s.reordered as f64 / n as f64;
        assert!((dup - 0.01).abs() < tol(0.01), "duplicate rate {dup}");
        assert!((reo - 0.02).abs() < tol(0.02), "reorder rate {reo}");
        for x in &v {
            match *x {
                Verdict::Deliver { delay, duplicate, reordered } => {
                    let expect = if reordered { 10 * MS + 5 * MS + REORDER_EXTRA_HOLD } else { 10 * MS };
                    assert_eq!(delay, expect);
                    if let Some(d) = duplicate {
                        assert_eq!(d, delay);
                    }
                }
                Verdict::Drop(r) => panic!("unexpected drop {r:?}"),
            }
        }
        // Reordered packets really are overtaken: packets are 100 us apart, the hold is 10 ms.
        let arrivals: Vec<Duration> = v
            .iter()
            .enumerate()
            .filter_map(|(i, x)| match x {
                Verdict::Deliver { delay, .. } => Some(Duration::from_micros(i as u64 * 100) + *delay),
                Verdict::Drop(_) => None,
            })
            .collect();
        let inversions = arrivals.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions as u64 >= s.reordered * 9 / 10, "{inversions} inversions");
    }

    #[test]
    fn packets_that_overtake_are_counted_whatever_reorders_them() {
        // 100 us apart with 5 ms of jitter: jitter alone reorders most packets.
        let imp = Impairment { delay: 20 * MS, jitter: 5 * MS, ..Default::default() };
        let (v, s) = run(imp, 4, 10_000);
        let mut latest = Duration::ZERO;
        let mut overtaking = 0;
        for (i, x) in v.iter().enumerate() {
            let Verdict::Deliver { delay, .. } = x else { continue };
            let arrival = Duration::from_micros(i as u64 * 100) + *delay;
            if arrival < latest {
                overtaking += 1;
            }
            latest = latest.max(arrival);
        }
        assert_eq!((s.reordered, s.overtaking), (0, overtaking));
        assert!(overtaking > 5_000, "{overtaking}");
        // Without jitter or reordering, nothing overtakes.
        let (_, s) = run(Impairment { delay: 20 * MS, loss: 0.1, ..Default::default() }, 4, 10_000);
        assert_eq!(s.overtaking, 0);
    }

    #[test]
    fn jitter_is_bounded() {
        let imp = Impairment { delay: 20 * MS, jitter: 5 * MS, ..Default::default() };
        let (v, _) = run(imp, 9, 10_000);
        let delays: Vec<Duration> = v.iter().flat_map(|x| x.deliveries()).collect();
        assert!(delays.iter().all(|d| *d >= 20 * MS && *d <= 25 * MS));
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        assert!(*min < 20 * MS + MS / 2 && *max > 25 * MS - MS / 2, "{min:?}..{max:?}");
    }

    #[test]
    fn rate_cap_serializes_packets() {
        // 1 MB/s: a 1000-byte packet takes 1 ms on the wire.
        let imp = Impairment { rate_bytes_per_s: Some(1_000_000), delay: 10 * MS, ..Default::default() };
        let mut m = LinkModel::new(imp, 1);
        let t0 = Instant::now();
        // A burst of 100 packets at the same instant: the k-th leaves after (k+1) ms.
        for k in 0..100u32 {
            match m.on_packet(t0, 1000) {
                Verdict::Deliver { delay, .. } => assert_eq!(delay, 10 * MS + (k + 1) * MS),
                v => panic!("{v:?}"),
            }
        }
        assert_eq!(m.stats().queued, 99);
        // After the queue drained, no queueing delay.
        match m.on_packet(t0 + Duration::from_secs(1), 1000) {
            Verdict::Deliver { delay, .. } => assert_eq!(delay, 11 * MS),
            v => panic!("{v:?}"),
        }
        // Offered load of 2 MB/s for two seconds: the queue fills up after one second (1 MB
        // waiting), then about half is dropped at the tail; delivery times never beat bytes / rate.
        let mut m = LinkModel::new(Impairment { rate_bytes_per_s: Some(1_000_000), ..Default::default() }, 1);
        let mut last = Duration::ZERO;
        let mut delivered_bytes = 0u64;
        for i in 0..4000u64 {
            let at = Duration::from_micros(i * 500);
            if let Verdict::Deliver { delay, .. } = m.on_packet(t0 + at, 1000) {
                let arrival = at + delay;
                delivered_bytes += 1000;
                assert!(arrival >= last + MS, "packets closer than their serialization time");
                assert!(arrival >= Duration::from_micros(delivered_bytes), "faster than the rate");
                last = arrival;
            }
        }
        let s = m.stats();
        assert!(s.dropped_queue > 800 && s.dropped_queue < 1200, "{s}");
        assert!(m.queue_backlog(t0 + Duration::from_secs(2)) <= Duration::from_secs(1));
    }

    #[test]
    fn queue_limit_drops_tail() {
        let imp =
            Impairment { rate_bytes_per_s: Some(1_000_000), queue_limit_bytes: Some(10_000), ..Default::default() };
        let mut m = LinkModel::new(imp, 1);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..20).map(|_| m.on_packet(t0, 1000)).collect();
        // 10 kB fit, counting the packet on the wire.
        assert!(verdicts[..10].iter().all(|v| !v.is_drop()));
        assert!(verdicts[10..].iter().all(|v| *v == Verdict::Drop(DropReason::Queue)));
    }

    #[test]
    fn partition_drops_everything_then_heals() {
        let mut m = LinkModel::new(Impairment { delay: 5 * MS, ..Default::default() }, 1);
        let t0 = Instant::now();
        assert!(!m.on_packet(t0, 100).is_drop());
        m.set_partitioned(true);
        assert!(m.is_partitioned());
        for _ in 0..100 {
            assert_eq!(m.on_packet(t0, 100), Verdict::Drop(DropReason::Partition));
        }
        m.set_partitioned(false);
        assert_eq!(m.on_packet(t0, 100), Verdict::Deliver { delay: 5 * MS, duplicate: None, reordered: false });
        let s = m.stats();
        assert_eq!((s.forwarded, s.dropped_partition, s.packets), (2, 100, 102));
    }

    #[test]
    fn seeds_are_independent() {
        let a = derive_seed(1, b"127.0.0.1:1->127.0.0.1:2");
        let b = derive_seed(1, b"127.0.0.1:2->127.0.0.1:1");
        let c = derive_seed(2, b"127.0.0.1:1->127.0.0.1:2");
        assert!(a != b && a != c && b != c);
        assert_eq!(a, derive_seed(1, b"127.0.0.1:1->127.0.0.1:2"));
        let mut r = SplitMix64::new(0);
        assert!((0..1000).all(|_| r.up_to(10) <= 10));
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01);
    }

    #[test]
    fn parse_helpers() {
        assert_eq!(parse_percent("2%"), Ok(0.02));
        assert_eq!(parse_percent("0.5%"), Ok(0.005));
        assert_eq!(parse_percent("0.02"), Ok(0.02));
        assert_eq!(parse_percent("100%"), Ok(1.0));
        assert_eq!(parse_percent("0"), Ok(0.0));
        assert!(parse_percent("2").unwrap_err().contains("2%"));
        assert!(parse_percent("150%").is_err());
        assert!(parse_percent("-1%").is_err());
        assert!(parse_percent("x").is_err());

        assert_eq!(parse_rate("100mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("1gbit"), Ok(125_000_000));
        assert_eq!(parse_rate("500kbit"), Ok(62_500));
        assert_eq!(parse_rate("100mbit/s"), Ok(12_500_000));
        assert_eq!(parse_rate("100Mb/s"), Ok(12_500_000));
        assert_eq!(parse_rate("12.5MB/s"), Ok(12_500_000));
        assert_eq!(parse_rate("1MiB/s"), Ok(1_048_576));
        assert_eq!(parse_rate("800kB/s"), Ok(800_000));
        assert_eq!(parse_rate("1250000"), Ok(1_250_000));
        assert_eq!(parse_rate("8000bit"), Ok(1000));
        assert!(parse_rate("10mbps").unwrap_err().contains("ambiguous"));
        assert!(parse_rate("10xbit").is_err());
        assert!(parse_rate("0mbit").is_err());
        assert!(parse_rate("fast").is_err());

        assert_eq!(parse_duration("250ms"), Ok(250 * MS));
        assert_eq!(parse_duration("1.5s"), Ok(1500 * MS));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("infs").is_err());
        assert!(parse_duration("1e300s").is_err());

        let ge = parse_burst("1%,30%,0%,50%").unwrap();
        assert_eq!(ge, GilbertElliott { p_good_to_bad: 0.01, p_bad_to_good: 0.3, loss_in_good: 0.0, loss_in_bad: 0.5 });
        assert!(parse_burst("1%,30%").is_err());
        assert!(everything().validate().is_ok());
        assert!(Impairment { loss: 1.5, ..Default::default() }.validate().is_err());
        assert!(Impairment { rate_bytes_per_s: Some(0), ..Default::default() }.validate().is_err());
        assert_eq!(Impairment::default().to_string(), "perfect");
        assert!(everything().to_string().contains("rate 100mbit"), "{}", everything());
    }
}
