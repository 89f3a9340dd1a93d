//! Seeded generator of realistic entry payloads for demos, load tests and benchmarks: structured,
//! partly repetitive text (like JSON documents of a memory store), not random bytes, so compression
//! ratios are representative.

use bytes::Bytes;

/// Generates payloads of a fixed size from a seed; the same seed gives the same payloads.
pub struct PayloadGen {
    state: u64,
    size: usize,
    counter: u64,
}

const ACTIONS: [&str; 4] = ["episode", "update", "delete", "checkpoint"];
const FIELDS: [&str; 6] = ["profile.name", "context.location", "memory.summary", "tags", "embedding.ref", "score"];
const WORDS: [&str; 12] =
    ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"];

impl PayloadGen {
    /// A generator of `size`-byte payloads seeded with `seed`.
    pub fn new(seed: u64, size: usize) -> PayloadGen {
        PayloadGen { state: seed ^ 0x5851_f42d_4c95_7f2d, size, counter: 0 }
    }

    fn next_u64(&mut self) -> u64 {
        // xorshift64*: small, fast and good enough for test data.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The next payload.
    pub fn next_payload(&mut self) -> Bytes {
        use std::fmt::Write;
        self.counter += 1;
        let r = self.next_u64();
        let mut s = String::with_capacity(self.size + 64);
        let _ = write!(
            s,
            r#"{{"id":{},"user":"u{:05}","op":"{}","field":"{}","value":"{} {} {:08x}"}}"#,
            self.counter,
            r % 50_000,
            ACTIONS[(r >> 20) as usize % ACTIONS.len()],
            FIELDS[(r >> 24) as usize % FIELDS.len()],
            WORDS[(r >> 28) as usize % WORDS.len()],
            WORDS[(r >> 32) as usize % WORDS.len()],
            (r >> 36) as u32,
        );
        while s.len() < self.size {
            s.push_str(WORDS[(self.next_u64() % WORDS.len() as u64) as usize]);
            s.push(' ');
        }
        s.truncate(self.size);
        Bytes::from(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_sized() {
        let mut a = PayloadGen::new(7, 128);
        let mut b = PayloadGen::new(7, 128);
        for _ in 0..100 {
            let p = a.next_payload();
            assert_eq!(p.len(), 128);
            assert_eq!(p, b.next_payload());
        }
        assert_eq!(PayloadGen::new(1, 16).next_payload().len(), 16);
    }
}
