//! A loss-and-reorder shim on one interface, for tests that need a bad network between two
//! namespaces: a tc BPF program on the interface's egress drops a share of its TCP packets and
//! delays another share so that later packets of the flow overtake them.
//!
//! The test kernels have neither `sch_netem` nor `sch_fq` (nor `matchall`, `act_gact`), and the
//! test hosts have no clang, so the shim is a few dozen BPF instructions assembled here, loaded
//! with `bpf(BPF_PROG_LOAD)` and attached with `bpf(BPF_LINK_CREATE)` (tcx). Closing the link
//! descriptors detaches the programs: nothing is pinned, nothing outlives the [`Chaos`].
//!
//! Delay without a delaying qdisc is a detour: a veth pair `dtNa`/`dtNb` in the shimmed
//! interface's namespace (up, no addresses). A packet picked for reordering gets a marker in
//! `skb->mark` (with a bounce count in its low byte) and is redirected to the egress of `dtNa`;
//! a program on the ingress of `dtNb` sends it round again (to `dtNa`) until the count is used
//! up, then to the egress of the shimmed interface, where the shim sees the marker, clears the
//! mark and passes it. Each veth hop queues the packet at the tail of the CPU's receive backlog,
//! so packets queued meanwhile (the rest of a burst, segments sent while the backlog drains) go
//! out before it (how many depends on the hop count: see [`ChaosSettings::bounces`]). The mark
//! survives a veth hop only within one namespace (`skb_scrub_packet`
//! clears it across namespaces), which is why both detour ends live with the shimmed interface.
//!
//! Counters (an ARRAY map read with `BPF_MAP_LOOKUP_ELEM`) say what the shim did, so a test can
//! prove it did something ([`Chaos::counts`]).
//!
//! Offloads matter: with TSO/GSO a 64 KB burst is one skb at tc egress. Turn them off on the
//! shimmed link ([`crate::line::Offloads::OFF`]) for per-segment loss and reordering.

use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cluster::in_netns;
use crate::line::{ip, mtu};

/// What the shim does to the TCP packets leaving an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChaosSettings {
    /// Packets dropped per million (0..=1,000,000).
    pub loss_per_million: u32,
    /// Packets (of those not dropped) delayed through the detour, per million.
    pub reorder_per_million: u32,
    /// Veth hops a delayed packet makes through the detour (1..=[`MAX_BOUNCES`]): more hops,
    /// more packets overtake it.
    ///
    /// Measured on the 2-CPU test VM (one CPU, 2 MiB one way, 5% detoured): up to 64 hops the
    /// receiver sees 0 to 2 segments out of order. A sender transmitting from process context
    /// runs the softirq its send raised before it sends again, and that run drains the whole
    /// detour; only segments a softirq sends in a burst (on an ACK) overtake. Beyond the
    /// backlog's quota of 64 packets per poll the detour outlasts the run: with 255 hops the
    /// receiver saw 217 to 307 segments out of order. Each hop costs CPU, so keep the detoured
    /// share small with many hops. (With two CPUs a veth also reorders by itself: each CPU
    /// queues what it sends on its own backlog.)
    pub bounces: u8,
}

/// The most detour hops [`ChaosSettings::bounces`] accepts (the count lives in the low byte of
/// the mark).
pub const MAX_BOUNCES: u8 = 255;

/// What the shim did so far (counts of TCP packets; other packets pass uncounted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChaosCounts {
    /// Passed straight through.
    pub passed: u64,
    /// Dropped.
    pub dropped: u64,
    /// Sent into the detour.
    pub detoured: u64,
    /// Came back from the detour and passed (at most `detoured`; short of it by packets still
    /// in the detour, or lost in it).
    pub returned: u64,
    /// Detour hops made, all packets together (`bounces` per returned packet).
    pub hops: u64,
}

/// The shim attached to one interface; dropping it detaches the programs and deletes the
/// detour veth.
#[derive(Debug)]
pub struct Chaos {
    // Dropped in this order: the links first (detaching the programs), then the programs, the
    // map and the detour veth.
    _links: Vec<OwnedFd>,
    _programs: Vec<OwnedFd>,
    counters: OwnedFd,
    _detour: Detour,
    netns: String,
    interface: String,
}

/// Counter slots of the map.
const PASSED: u32 = 0;
const DROPPED: u32 = 1;
const DETOURED: u32 = 2;
const RETURNED: u32 = 3;
const HOPS: u32 = 4;
const SLOTS: u32 = 5;

/// `skb->mark` of a packet in the detour: this in the upper 24 bits, hops left in the low 8.
/// Below 2^31, so it compares the same as a sign-extended 32-bit immediate.
const MARKER: i32 = 0x5eed_0000;
const MARKER_MASK: i32 = 0xffff_ff00_u32 as i32;

impl Chaos {
    /// Attaches the shim to the egress of `interface` in namespace `netns` (a name under
    /// `/run/netns`), with a detour veth made in the same namespace.
    pub fn attach(netns: &str, interface: &str, settings: ChaosSettings) -> io::Result<Chaos> {
        if settings.loss_per_million > 1_000_000
            || settings.reorder_per_million > 1_000_000
            || !(1..=MAX_BOUNCES).contains(&settings.bounces)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chaos settings out of range: {settings:?}"),
            ));
        }
        let detour = Detour::create(netns, mtu(netns, interface)?)?;
        let (a, b, shimmed) = (detour.a.clone(), detour.b.clone(), interface.to_owned());
        let (links, programs, counters) = in_netns(netns, move || -> io::Result<_> {
            let shimmed = crate::line::ifindex_here(&shimmed)?;
            let a = crate::line::ifindex_here(&a)?;
            let b = crate::line::ifindex_here(&b)?;
            let counters = map_create(SLOTS)?;
            let shim = prog_load(
                "chaos_shim",
                &shim_program(counters.as_raw_fd(), settings, a),
            )?;
            let bounce = prog_load(
                "chaos_bounce",
                &bounce_program(counters.as_raw_fd(), a, shimmed),
            )?;
            // The bounce program first: the shim sends packets its way from the start.
            let links = vec![
                link_create(&bounce, b, BPF_TCX_INGRESS)?,
                link_create(&shim, shimmed, BPF_TCX_EGRESS)?,
            ];
            Ok((links, vec![shim, bounce], counters))
        })?;
        Ok(Chaos {
            _links: links,
            _programs: programs,
            counters,
            _detour: detour,
            netns: netns.to_owned(),
            interface: interface.to_owned(),
        })
    }

    /// The counters now.
    pub fn counts(&self) -> io::Result<ChaosCounts> {
        let slot = |index| map_lookup_u64(&self.counters, index);
        Ok(ChaosCounts {
            passed: slot(PASSED)?,
            dropped: slot(DROPPED)?,
            detoured: slot(DETOURED)?,
            returned: slot(RETURNED)?,
            hops: slot(HOPS)?,
        })
    }

    /// The namespace of the shimmed interface.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The shimmed interface.
    pub fn interface(&self) -> &str {
        &self.interface
    }
}

/// The detour veth pair; deleted when dropped (deleting one end deletes both).
#[derive(Debug)]
struct Detour {
    netns: String,
    a: String,
    b: String,
}

impl Detour {
    /// Creates `dtNa`/`dtNb` in `netns` with the shimmed interface's MTU (a veth drops what
    /// exceeds its MTU), no addresses (`addrgenmode none`: no IPv6 link-local traffic), up.
    fn create(netns: &str, mtu: u32) -> io::Result<Detour> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let detour = Detour {
            netns: netns.to_owned(),
            a: format!("dt{n}a"),
            b: format!("dt{n}b"),
        };
        ip(&[
            "-n", netns, "link", "add", "name", &detour.a, "type", "veth", "peer", "name",
            &detour.b,
        ])?;
        // From here on, an error drops `detour`, which deletes the pair.
        for end in [&detour.a, &detour.b] {
            ip(&[
                "-n",
                netns,
                "link",
                "set",
                "dev",
                end,
                "addrgenmode",
                "none",
            ])?;
            ip(&[
                "-n",
                netns,
                "link",
                "set",
                "dev",
                end,
                "mtu",
                &mtu.to_string(),
            ])?;
            ip(&["-n", netns, "link", "set", "dev", end, "up"])?;
        }
        Ok(detour)
    }
}

impl Drop for Detour {
    fn drop(&mut self) {
        // Fails harmlessly when the namespace went first (it took the pair with it).
        let _ = ip(&["-n", &self.netns, "link", "del", "dev", &self.a]);
    }
}

// ---- The bpf(2) syscall ----

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// Bytes of `union bpf_attr` passed (zero beyond the fields used, as the kernel requires).
const ATTR_SIZE: usize = 128;

/// A zeroed `bpf_attr` filled field by field (native-endian, at byte offsets).
struct Attr([u8; ATTR_SIZE]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_SIZE])
    }

    fn u32(mut self, offset: usize, value: u32) -> Attr {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(mut self, offset: usize, value: u64) -> Attr {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn bytes(mut self, offset: usize, value: &[u8]) -> Attr {
        self.0[offset..offset + value.len()].copy_from_slice(value);
        self
    }

    /// Runs `cmd`; the non-negative result.
    fn call(mut self, cmd: libc::c_long) -> io::Result<libc::c_long> {
        // SAFETY: `self.0` is a bpf_attr of ATTR_SIZE bytes, zero but for the command's fields;
        // the pointers inside it point at buffers the caller keeps alive across the call, of
        // the sizes the fields beside them give.
        let result = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                self.0.as_mut_ptr(),
                ATTR_SIZE as libc::c_uint,
            )
        };
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }

    /// Runs `cmd`, which returns a new descriptor.
    fn call_fd(self, cmd: libc::c_long) -> io::Result<OwnedFd> {
        let fd = self.call(cmd)? as RawFd;
        // SAFETY: a fresh descriptor the kernel just returned to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// `BPF_MAP_CREATE`: an ARRAY of `slots` u64 counters, keyed by u32.
fn map_create(slots: u32) -> io::Result<OwnedFd> {
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"chaos_counts");
    Attr::new()
        .u32(0, BPF_MAP_TYPE_ARRAY)
        .u32(4, 4)
        .u32(8, 8)
        .u32(12, slots)
        .bytes(28, &name)
        .call_fd(BPF_MAP_CREATE)
}

/// `BPF_MAP_LOOKUP_ELEM` of one counter.
fn map_lookup_u64(map: &OwnedFd, index: u32) -> io::Result<u64> {
    let key = index;
    let mut value = 0u64;
    Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, std::ptr::from_ref(&key) as u64)
        .u64(16, std::ptr::from_mut(&mut value) as u64)
        .call(BPF_MAP_LOOKUP_ELEM)?;
    Ok(value)
}

/// `BPF_PROG_LOAD` of a SCHED_CLS program; on failure, loads again with the verifier's log
/// and returns that in the error.
fn prog_load(name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    let code: Vec<u8> = insns.iter().flat_map(|insn| insn.encode()).collect();
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    prog_name[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    let attr = |log: &mut [u8]| {
        Attr::new()
            .u32(0, BPF_PROG_TYPE_SCHED_CLS)
            .u32(4, insns.len() as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, u32::from(!log.is_empty()))
            .u32(28, log.len() as u32)
            // No buffer without a size: the kernel refuses a pointer with a zero size.
            .u64(
                32,
                if log.is_empty() {
                    0
                } else {
                    log.as_mut_ptr() as u64
                },
            )
            .bytes(48, &prog_name)
    };
    match attr(&mut []).call_fd(BPF_PROG_LOAD) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            let mut log = vec![0u8; 1 << 20];
            let _ = attr(&mut log).call_fd(BPF_PROG_LOAD);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(io::Error::new(
                error.kind(),
                format!(
                    "loading {name}: {error}; verifier: {}",
                    String::from_utf8_lossy(&log[..end])
                ),
            ))
        }
    }
}

/// `BPF_LINK_CREATE` attaching `program` to interface `ifindex` of the calling thread's
/// namespace (tcx).
fn link_create(program: &OwnedFd, ifindex: u32, attach_type: u32) -> io::Result<OwnedFd> {
    Attr::new()
        .u32(0, program.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, attach_type)
        .call_fd(BPF_LINK_CREATE)
}

// ---- A small BPF assembler ----

/// One `struct bpf_insn`.
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    dst: u8,
    src: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    /// The 8 bytes the kernel reads (`dst_reg` in the low nibble of byte 1 on little-endian
    /// machines, the high one on big-endian).
    fn encode(self) -> [u8; 8] {
        let regs = if cfg!(target_endian = "little") {
            self.dst | (self.src << 4)
        } else {
            (self.dst << 4) | self.src
        };
        let off = self.off.to_ne_bytes();
        let imm = self.imm.to_ne_bytes();
        [
            self.code, regs, off[0], off[1], imm[0], imm[1], imm[2], imm[3],
        ]
    }
}

// Instruction classes, sizes, modes and operations (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ST: u8 = 0x02;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const ATOMIC: u8 = 0xc0;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const AND: u8 = 0x50;
const MOD: u8 = 0x90;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const JLE: u8 = 0xb0;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
/// `src_reg` of a `ld_imm64` whose immediate is a map descriptor.
const PSEUDO_MAP_FD: u8 = 1;

// Registers.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R10: u8 = 10;

// Helpers.
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_PRANDOM_U32: i32 = 7;
const REDIRECT: i32 = 23;

// `struct __sk_buff` offsets.
const SKB_MARK: i16 = 8;
const SKB_PROTOCOL: i16 = 16;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

// tc verdicts.
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;

/// `skb->protocol` (network order in a u32) of IPv4 and IPv6.
const PROTOCOL_IPV4: i32 = 0x0800_u16.to_be() as i32;
const PROTOCOL_IPV6: i32 = 0x86dd_u16.to_be() as i32;
/// Offsets of the IPv4 protocol and IPv6 next-header bytes after a 14-byte Ethernet header.
const IPV4_PROTOCOL_AT: i16 = 14 + 9;
const IPV6_NEXT_HEADER_AT: i16 = 14 + 6;
const IPPROTO_TCP: i32 = 6;

/// Instructions with named jump targets, resolved by [`Asm::finish`].
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    /// Jumps to patch: instruction index and target label.
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }

    /// `dst = imm` (64-bit, sign-extended).
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.op(ALU64 | MOV | K, dst, 0, 0, imm);
    }

    /// `dst = src` (64-bit).
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.op(ALU64 | MOV | X, dst, src, 0, 0);
    }

    /// 64-bit `dst OP= imm`.
    fn alu64_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.op(ALU64 | op | K, dst, 0, 0, imm);
    }

    /// 32-bit `wdst OP= imm` (the upper half zeroed).
    fn alu32_imm(&mut self, op: u8, dst: u8, imm: i32) {
        self.op(ALU | op | K, dst, 0, 0, imm);
    }

    /// 32-bit `wdst = wsrc`.
    fn mov32_reg(&mut self, dst: u8, src: u8) {
        self.op(ALU | MOV | X, dst, src, 0, 0);
    }

    /// `dst = *(size *)(src + off)`.
    fn load(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.op(LDX | MEM | size, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = src`.
    fn store_reg(&mut self, size: u8, dst: u8, off: i16, src: u8) {
        self.op(STX | MEM | size, dst, src, off, 0);
    }

    /// `*(size *)(dst + off) = imm` (not for the context: the verifier refuses that).
    fn store_imm(&mut self, size: u8, dst: u8, off: i16, imm: i32) {
        self.op(ST | MEM | size, dst, 0, off, imm);
    }

    /// `dst = map` (a two-slot `ld_imm64` with the map's descriptor).
    fn load_map(&mut self, dst: u8, map_fd: RawFd) {
        self.op(LD | IMM | DW, dst, PSEUDO_MAP_FD, 0, map_fd);
        self.op(0, 0, 0, 0, 0);
    }

    /// `if (dst OP imm) goto label`, 64-bit compare.
    fn jump_imm(&mut self, op: u8, dst: u8, imm: i32, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(JMP | op | K, dst, 0, 0, imm);
    }

    /// `if (wdst OP imm) goto label`, 32-bit compare.
    fn jump32_imm(&mut self, op: u8, dst: u8, imm: i32, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(JMP32 | op | K, dst, 0, 0, imm);
    }

    /// `if (dst OP src) goto label`, 64-bit compare.
    fn jump_reg(&mut self, op: u8, dst: u8, src: u8, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(JMP | op | X, dst, src, 0, 0);
    }

    /// `goto label`.
    fn goto(&mut self, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(JMP | JA, 0, 0, 0, 0);
    }

    fn call(&mut self, helper: i32) {
        self.op(JMP | CALL, 0, 0, 0, helper);
    }

    /// `return imm`.
    fn exit_with(&mut self, verdict: i32) {
        self.mov_imm(R0, verdict);
        self.op(JMP | EXIT, 0, 0, 0, 0);
    }

    /// `return r0`.
    fn exit(&mut self) {
        self.op(JMP | EXIT, 0, 0, 0, 0);
    }

    /// Adds 1 to counter `slot` of `map` (clobbers r0-r5 and the stack word at r10-4).
    fn count(&mut self, map_fd: RawFd, slot: u32) {
        self.store_imm(W, R10, -4, slot as i32);
        self.mov_reg(R2, R10);
        self.alu64_imm(ADD, R2, -4);
        self.load_map(R1, map_fd);
        self.call(MAP_LOOKUP_ELEM);
        // if r0 == NULL skip the two instructions below (an ARRAY lookup of a key in range
        // never fails, but the verifier wants the check).
        self.op(JMP | JEQ | K, R0, 0, 2, 0);
        self.mov_imm(R1, 1);
        // lock *(u64 *)(r0 + 0) += r1
        self.op(STX | ATOMIC | DW, R0, R1, 0, i32::from(ADD));
    }

    /// `bpf_redirect(ifindex, 0)` to the egress of `ifindex`, and return its verdict.
    fn redirect(&mut self, ifindex: u32) {
        self.mov_imm(R1, ifindex as i32);
        self.mov_imm(R2, 0);
        self.call(REDIRECT);
        self.exit();
    }

    /// The instructions with every jump pointed at its label.
    fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(name, _)| *name == label)
                .map(|&(_, index)| index);
            // Invariant: the programs below define every label they jump to (a typo fails
            // every test that attaches a shim, at once).
            let target = target.unwrap_or_else(|| panic!("undefined label {label}"));
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// The shim, on the egress of the shimmed interface: marked packets back from the detour pass
/// (mark cleared); TCP packets are dropped, detoured or passed by the dice.
fn shim_program(map_fd: RawFd, settings: ChaosSettings, detour: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_reg(R6, R1);
    // Back from the detour?
    a.load(W, R7, R6, SKB_MARK);
    a.mov32_reg(R3, R7);
    a.alu32_imm(AND, R3, MARKER_MASK);
    a.jump32_imm(JEQ, R3, MARKER, "returned");
    // TCP over IPv4 or IPv6?
    a.load(W, R2, R6, SKB_PROTOCOL);
    a.jump32_imm(JEQ, R2, PROTOCOL_IPV4, "ipv4");
    a.jump32_imm(JEQ, R2, PROTOCOL_IPV6, "ipv6");
    a.goto("other");
    a.label("ipv4");
    a.load(W, R2, R6, SKB_DATA);
    a.load(W, R3, R6, SKB_DATA_END);
    a.mov_reg(R4, R2);
    a.alu64_imm(ADD, R4, i32::from(IPV4_PROTOCOL_AT) + 1);
    a.jump_reg(JGT, R4, R3, "other");
    a.load(B, R4, R2, IPV4_PROTOCOL_AT);
    a.goto("l4");
    a.label("ipv6");
    a.load(W, R2, R6, SKB_DATA);
    a.load(W, R3, R6, SKB_DATA_END);
    a.mov_reg(R4, R2);
    a.alu64_imm(ADD, R4, i32::from(IPV6_NEXT_HEADER_AT) + 1);
    a.jump_reg(JGT, R4, R3, "other");
    a.load(B, R4, R2, IPV6_NEXT_HEADER_AT);
    a.label("l4");
    a.jump_imm(JNE, R4, IPPROTO_TCP, "other");
    // The dice: loss first, then reordering.
    a.call(GET_PRANDOM_U32);
    a.alu32_imm(MOD, R0, 1_000_000);
    a.jump32_imm(JLT, R0, settings.loss_per_million as i32, "drop");
    a.call(GET_PRANDOM_U32);
    a.alu32_imm(MOD, R0, 1_000_000);
    a.jump32_imm(JLT, R0, settings.reorder_per_million as i32, "detour");
    a.count(map_fd, PASSED);
    a.exit_with(TC_ACT_OK);
    a.label("drop");
    a.count(map_fd, DROPPED);
    a.exit_with(TC_ACT_SHOT);
    a.label("detour");
    a.count(map_fd, DETOURED);
    a.mov_imm(R1, MARKER | i32::from(settings.bounces));
    a.store_reg(W, R6, SKB_MARK, R1);
    a.redirect(detour);
    a.label("returned");
    a.mov_imm(R1, 0);
    a.store_reg(W, R6, SKB_MARK, R1);
    a.count(map_fd, RETURNED);
    a.exit_with(TC_ACT_OK);
    a.label("other");
    a.exit_with(TC_ACT_OK);
    a.finish()
}

/// The detour's far end, on the ingress of `dtNb`: a marked packet goes round again (egress of
/// `dtNa`) while hops are left, else back to the egress of the shimmed interface, still marked
/// (with 0 hops left) so the shim knows it. Anything else passes.
fn bounce_program(map_fd: RawFd, detour: u32, shimmed: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_reg(R6, R1);
    a.load(W, R7, R6, SKB_MARK);
    a.mov32_reg(R3, R7);
    a.alu32_imm(AND, R3, MARKER_MASK);
    a.jump32_imm(JNE, R3, MARKER, "other");
    a.count(map_fd, HOPS);
    // Hops left, this one included.
    a.mov32_reg(R3, R7);
    a.alu32_imm(AND, R3, 0xff);
    a.jump32_imm(JLE, R3, 1, "home");
    a.alu32_imm(SUB, R7, 1);
    a.store_reg(W, R6, SKB_MARK, R7);
    a.redirect(detour);
    a.label("home");
    a.mov_imm(R1, MARKER);
    a.store_reg(W, R6, SKB_MARK, R1);
    a.redirect(shimmed);
    a.label("other");
    a.exit_with(TC_ACT_OK);
    a.finish()
}
