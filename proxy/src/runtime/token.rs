//! The `user_data` of io_uring operations: which operation, for which connection slot.

/// The kind of an io_uring operation, so its completion is routed to the right handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on listener `slot`.
    Accept = 1,
    /// The worker's periodic wake-up.
    Tick = 2,
    /// Cancellation of listener `slot`'s accept (drain).
    CancelAccept = 3,
    /// The worker's mailbox eventfd is readable (pressure reports).
    Wake = 4,
    /// Readiness of the client socket.
    PollClient = 10,
    /// Readiness of the upstream socket.
    PollUpstream = 11,
    /// A send to the client.
    SendClient = 12,
    /// A send to the upstream.
    SendUpstream = 13,
    /// Connect to the upstream.
    Connect = 14,
    /// The timeout linked to a connect.
    ConnectTimeout = 15,
    /// Cancellation of a connection's operations (close).
    Cancel = 16,
}

impl Op {
    fn from_u8(value: u8) -> Option<Op> {
        Some(match value {
            1 => Op::Accept,
            2 => Op::Tick,
            3 => Op::CancelAccept,
            4 => Op::Wake,
            10 => Op::PollClient,
            11 => Op::PollUpstream,
            12 => Op::SendClient,
            13 => Op::SendUpstream,
            14 => Op::Connect,
            15 => Op::ConnectTimeout,
            16 => Op::Cancel,
            _ => return None,
        })
    }
}

/// Decoded `user_data`: kind, slot and the low 24 bits of the connection id (a guard against a
/// completion reaching a reused slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    /// The operation.
    pub op: Op,
    /// Connection or listener slot.
    pub slot: u32,
    /// Low 24 bits of the connection id.
    pub generation: u32,
}

const GENERATION_MASK: u64 = 0xff_ffff;

impl Token {
    /// A token for `op` on `slot` of connection `id`.
    pub fn new(op: Op, slot: u32, id: u64) -> Token {
        Token {
            op,
            slot,
            generation: (id & GENERATION_MASK) as u32,
        }
    }

    /// Packs into io_uring `user_data`.
    pub fn encode(self) -> u64 {
        (self.op as u64) << 56 | u64::from(self.slot) << 24 | u64::from(self.generation)
    }

    /// Unpacks `user_data`; `None` for values this worker never submitted.
    pub fn decode(user_data: u64) -> Option<Token> {
        Some(Token {
            op: Op::from_u8((user_data >> 56) as u8)?,
            slot: ((user_data >> 24) & 0xffff_ffff) as u32,
            generation: (user_data & GENERATION_MASK) as u32,
        })
    }

    /// Whether this token belongs to connection `id`.
    pub fn is_for(&self, id: u64) -> bool {
        u64::from(self.generation) == id & GENERATION_MASK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for op in [Op::Accept, Op::PollClient, Op::Cancel, Op::ConnectTimeout] {
            let token = Token::new(op, 0xdead_beef, 0x1234_5678_9abc);
            let back = Token::decode(token.encode()).unwrap();
            assert_eq!(back, token);
            assert!(back.is_for(0x1234_5678_9abc));
            assert!(!back.is_for(0x1234_5678_9abd));
        }
        assert_eq!(Token::decode(0), None);
    }
}
