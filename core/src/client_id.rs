//! Deterministic MQTT client identifiers for brokers configured without one.
//!
//! Why deterministic: an MQTT broker keys persistent sessions (queued QoS 1/2
//! messages, subscriptions) by client id. If mqtt_pg invented a random id on
//! every start, each restart of the background worker would orphan the old
//! session and lose whatever the broker had queued for it. Deriving the id
//! from stable facts about the installation keeps the same session across
//! restarts.
//!
//! Why these inputs: two connections with the same client id kick each other
//! off the broker (MQTT "session takeover"), so the id must differ for every
//! connection mqtt_pg may open. A connection is identified by the cluster
//! (`pg_control_system().system_identifier`, unique per `initdb`), the
//! database (its OID) and the broker row (`broker_id`).
//!
//! Why 23 characters of `[0-9a-z]`: MQTT 3.1.1 (section 3.1.3.1) only
//! *requires* servers to accept client ids of 1 to 23 bytes drawn from
//! `0-9a-zA-Z`; longer ids or other characters are allowed to be rejected.
//! Staying inside that envelope means the generated id works with every
//! compliant broker. Lower case only avoids surprises with tools that treat
//! ids case-insensitively.
//!
//! The hash is fixed and documented so ids never change between mqtt_pg
//! versions (changing them would orphan sessions, see above):
//!
//! 1. Concatenate `system_identifier` (8 bytes), `database_oid` (4 bytes)
//!    and `broker_id` (4 bytes, two's complement), each little-endian.
//! 2. Hash those 16 bytes with 128-bit FNV-1a (offset basis
//!    `0x6c62272e07bb014262b821756295c58d`, prime `2^88 + 2^8 + 0x3b`).
//! 3. Split the hash into 64-bit halves `hi` (upper) and `lo` (lower) and
//!    run three Feistel rounds with MurmurHash3's `fmix64` finalizer:
//!    `hi ^= fmix64(lo); lo ^= fmix64(hi); hi ^= fmix64(lo)`.
//! 4. Reduce `(hi << 64) | lo` modulo `36^17` and write it as 17 base-36
//!    digits (`0-9a-z`), zero-padded on the left.
//! 5. Prefix `mqttpg`, giving exactly 23 characters.
//!
//! Step 3 exists because FNV only propagates changes upwards through its
//! multiplication, and its sparse 128-bit prime moves a change in the last
//! input bytes (the broker id) into few bits: without it, ids of the brokers
//! of one database would share most leading characters. The Feistel rounds
//! are a bijection, so they add mixing without adding collisions.
//!
//! 128-bit rather than 64-bit FNV is used so all 17 available characters
//! carry entropy (~88 bits, versus 64 bits in at most 13 digits), making an
//! accidental collision between two installations vanishingly unlikely.

/// Length of every generated client id: the largest length MQTT 3.1.1
/// servers are required to accept.
pub const GENERATED_CLIENT_ID_LEN: usize = 23;

/// Fixed prefix, so a DBA looking at a broker's client list can tell which
/// connections come from mqtt_pg.
const PREFIX: &str = "mqttpg";

const FNV128_OFFSET_BASIS: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
const FNV128_PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;

const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Returns the client id mqtt_pg uses for `broker_id` in database
/// `database_oid` of the cluster `system_identifier` when the broker row
/// does not specify one.
///
/// Always 23 characters of `[0-9a-z]` starting with `mqttpg`; the same
/// inputs always give the same id (see the module documentation for the
/// exact algorithm).
pub fn generated_client_id(system_identifier: u64, database_oid: u32, broker_id: i32) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&system_identifier.to_le_bytes());
    bytes[8..12].copy_from_slice(&database_oid.to_le_bytes());
    bytes[12..].copy_from_slice(&broker_id.to_le_bytes());

    let hash = fnv1a_128(&bytes);
    let mut hi = (hash >> 64) as u64;
    let mut lo = hash as u64;
    hi ^= fmix64(lo);
    lo ^= fmix64(hi);
    hi ^= fmix64(lo);
    with_digits(PREFIX, (u128::from(hi) << 64) | u128::from(lo))
}

/// Prefix of the client ids of test connections (`mqtt_test_connection`), so a broker's log
/// tells them from the worker's connections.
pub const PROBE_PREFIX: &str = "mqttpgtest";

/// A fresh random client id for a test connection, never equal to `avoid` (the broker's own
/// client id). Two connections with one client id take each other's session over: a test that
/// borrowed the worker's id would disconnect the worker, and with a clean session wipe the
/// subscriptions and queued messages the broker keeps for it. Random rather than derived, so
/// that tests running at the same moment do not take each other over either. Same envelope as
/// generated ids: 23 characters of `[0-9a-z]`.
pub fn probe_client_id(avoid: &str) -> String {
    loop {
        let id = with_digits(PROBE_PREFIX, random_u128());
        if id != avoid {
            return id;
        }
    }
}

/// 128 random bits from the system's generator; should that ever fail, the standard library's
/// per-process random hash keys mixed with the clock (unique enough for a client id).
fn random_u128() -> u128 {
    use aws_lc_rs::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 16];
    if SystemRandom::new().fill(&mut bytes).is_ok() {
        return u128::from_le_bytes(bytes);
    }
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let lo = h.finish();
    h.write_u64(lo);
    (u128::from(h.finish()) << 64) | u128::from(lo)
}

/// `prefix` followed by `value` (reduced to fit) in base-36 digits, zero-padded on the left,
/// [`GENERATED_CLIENT_ID_LEN`] characters in all.
fn with_digits(prefix: &str, value: u128) -> String {
    let n = GENERATED_CLIENT_ID_LEN - prefix.len();
    let mut value = value % 36u128.pow(n as u32);
    let mut digits = vec![b'0'; n];
    for slot in digits.iter_mut().rev() {
        *slot = BASE36[(value % 36) as usize];
        value /= 36;
    }
    let mut id = String::with_capacity(GENERATED_CLIENT_ID_LEN);
    id.push_str(prefix);
    // Every byte comes from BASE36, so this is ASCII.
    id.extend(digits.iter().map(|&b| char::from(b)));
    id
}

/// 128-bit FNV-1a, as specified at <http://www.isthe.com/chongo/tech/comp/fnv/>.
fn fnv1a_128(data: &[u8]) -> u128 {
    data.iter().fold(FNV128_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u128::from(byte)).wrapping_mul(FNV128_PRIME)
    })
}

/// MurmurHash3's 64-bit finalizer: a bijection with full avalanche.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn assert_well_formed(id: &str) {
        assert_eq!(id.len(), GENERATED_CLIENT_ID_LEN, "{id}");
        assert!(id.starts_with("mqttpg"), "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()),
            "{id}"
        );
    }

    #[test]
    fn fnv1a_128_reference_vectors() {
        // Published FNV-1a 128 test vectors.
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a_128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn fmix64_reference_values() {
        assert_eq!(fmix64(0), 0);
        // Distinct inputs stay distinct (it is a bijection) and one flipped
        // bit changes roughly half of the output bits.
        let flipped = (fmix64(1) ^ fmix64(3)).count_ones();
        assert!((16..=48).contains(&flipped), "{flipped}");
    }

    #[test]
    fn shape_for_extreme_inputs() {
        for sys in [0, 1, u64::MAX, 7_300_000_000_000_000_000] {
            for db in [0, 1, 5, 16_384, u32::MAX] {
                for broker in [i32::MIN, -1, 0, 1, i32::MAX] {
                    assert_well_formed(&generated_client_id(sys, db, broker));
                }
            }
        }
    }

    #[test]
    fn stable_golden_values() {
        // These must never change: a changed id orphans the broker session.
        // They were cross-checked against an independent implementation of
        // the documented algorithm (Python, arbitrary-precision integers).
        assert_eq!(
            generated_client_id(7_300_000_000_000_000_000, 16_384, 1),
            "mqttpgs73hhzr88ke6np396"
        );
        assert_eq!(generated_client_id(0, 0, 0), "mqttpg92snw5e76pxtx9lw7");
        assert_eq!(
            generated_client_id(u64::MAX, u32::MAX, -1),
            "mqttpggii0q4isehvue8nah"
        );
    }

    #[test]
    fn deterministic() {
        let a = generated_client_id(123_456_789, 5, 42);
        let b = generated_client_id(123_456_789, 5, 42);
        assert_eq!(a, b);
    }

    #[test]
    fn distinct_across_databases_brokers_and_clusters() {
        let clusters = [
            0u64,
            1,
            7_300_000_000_000_000_000,
            7_300_000_000_000_000_001,
            u64::MAX,
        ];
        let mut seen = HashSet::new();
        let mut count = 0;
        for &sys in &clusters {
            for db in (0..30u32).chain([16_384, 16_385, 24_576, u32::MAX]) {
                for broker in (-2..40i32).chain([i32::MAX, i32::MIN]) {
                    let id = generated_client_id(sys, db, broker);
                    assert_well_formed(&id);
                    assert!(seen.insert(id.clone()), "collision: {id}");
                    count += 1;
                }
            }
        }
        assert_eq!(count, 5 * 34 * 44);
        assert_eq!(seen.len(), count);
    }

    #[test]
    fn fields_are_not_interchangeable() {
        // Same numbers in different positions must not collide.
        assert_ne!(generated_client_id(1, 0, 0), generated_client_id(0, 1, 0));
        assert_ne!(generated_client_id(0, 1, 0), generated_client_id(0, 0, 1));
        assert_ne!(generated_client_id(1, 0, 0), generated_client_id(0, 0, 1));
        // Adjacent values differ widely, not just in the last digit.
        let a = generated_client_id(42, 16_384, 1);
        let b = generated_client_id(42, 16_384, 2);
        let differing = a.bytes().zip(b.bytes()).filter(|(x, y)| x != y).count();
        assert!(differing > 10, "{a} vs {b}");
    }

    #[test]
    fn probe_ids_are_fresh_and_well_formed() {
        let ids: HashSet<String> = (0..1000).map(|_| probe_client_id("")).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_well_formed(id);
            assert!(id.starts_with(PROBE_PREFIX), "{id}");
        }
        // Never the id it must avoid, even one of its own shape.
        let taken = ids.iter().next().cloned().unwrap_or_default();
        assert!((0..1000).all(|_| probe_client_id(&taken) != taken));
    }

    #[test]
    fn uses_the_whole_digit_space() {
        // Leading digits are not stuck at zero padding: over many ids the
        // first hash digit takes many different values.
        let first: HashSet<u8> = (0..500)
            .map(|i| generated_client_id(9, 16_384, i).as_bytes()[PREFIX.len()])
            .collect();
        assert!(first.len() > 30, "{}", first.len());
    }
}
