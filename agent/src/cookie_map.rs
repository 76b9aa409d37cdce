//! Maps keyed by socket cookie, bounded without a clock: entries live in two
//! generations, a hit moves an entry to the current one, and when the current
//! one is full the previous one is forgotten. An entry not used for two
//! generations' worth of new sockets is gone.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// Socket cookies come from a kernel counter, never from the network, so a
/// multiply-fold hash is safe here and several times cheaper than SipHash;
/// these maps are looked up once per traced message.
#[derive(Default)]
struct CookieHasher(u64);

impl Hasher for CookieHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        let m = u128::from(self.0 ^ n) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ (m >> 64) as u64;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Cookies<V> = HashMap<u64, V, BuildHasherDefault<CookieHasher>>;

pub struct CookieMap<V> {
    current: Cookies<V>,
    previous: Cookies<V>,
    per_generation: usize,
}

impl<V> CookieMap<V> {
    /// Holds up to `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        CookieMap {
            current: Cookies::default(),
            previous: Cookies::default(),
            per_generation: (capacity / 2).max(1),
        }
    }

    pub fn insert(&mut self, cookie: u64, value: V) {
        self.previous.remove(&cookie);
        self.make_room();
        self.current.insert(cookie, value);
    }

    /// The entry of `cookie`, now in the current generation.
    pub fn get(&mut self, cookie: u64) -> Option<&V> {
        if !self.current.contains_key(&cookie) {
            let v = self.previous.remove(&cookie)?;
            self.make_room();
            self.current.insert(cookie, v);
        }
        self.current.get(&cookie)
    }

    /// Entries held, stale copies included (at most `capacity`).
    pub fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make_room(&mut self) {
        if self.current.len() >= self.per_generation {
            self.previous = std::mem::take(&mut self.current);
        }
    }
}
