//! Stable hashes: the same value for the same bytes in every process, host and version, for
//! what must agree across them (the eBPF object a successor compares, the consistent-hash ring
//! several proxies share). Not for tables an attacker fills: those use `RandomState`.

/// FNV-1a over `bytes`, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// FNV-1a, then MurmurHash3's finalizer: FNV alone leaves similar inputs (`10.0.0.1:80#1`,
/// `10.0.0.1:80#2`) close together, which would bunch a ring's points.
pub fn spread(bytes: &[u8]) -> u64 {
    let mut h = fnv1a(bytes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn spread_separates_neighbouring_inputs() {
        let a = spread(b"10.0.0.1:80#1");
        let b = spread(b"10.0.0.1:80#2");
        assert!((a ^ b).count_ones() > 16, "{a:x} {b:x}");
    }
}
