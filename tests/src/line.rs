//! A line of three network namespaces for tests of a data path that sits between a client and
//! an upstream on the packet level (the future "packet splice": a tc eBPF program in the proxy's
//! namespace that rewrites a tunnel's packets itself):
//!
//! ```text
//!   client netns                 proxy netns                              upstream netns
//!   {p}c 10.O.1.2 ──── veth ──── {p}pc 10.O.1.1   {p}pu 10.O.2.1 ──── veth ──── {p}u 10.O.2.2
//!        fd00:88:O:1::2/64            fd00:88:O:1::1   fd00:88:O:2::1              fd00:88:O:2::2/64
//! ```
//!
//! `{p}` is the test's name prefix, `O` an octet picked from it. The client and the upstream
//! route everything through the proxy (default routes, IPv4 and IPv6), but the proxy does not
//! forward (`ip_forward` and IPv6 `forwarding` are 0): it terminates connections, and the
//! program under test redirects packets itself. IPv6 addresses are added with `nodad`, so they
//! are usable at once.
//!
//! Each test names its own line (a prefix such as `"ps1"`): the namespaces carry the prefix and
//! the PID, the interfaces the prefix (they live in the line's own namespaces), so tests run in
//! parallel. Dropping the [`Line`] deletes the namespaces, which deletes the veths with them.
//!
//! Links can get an MTU and offload settings ([`LinkSettings`]). The offloads are switched with
//! the `SIOCETHTOOL` request `ethtool -K` makes (the `ethtool` program is not installed on the
//! test hosts, so the harness makes the request itself; nothing is skipped).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::process::Command;

use crate::cluster::{in_netns, Netns};

/// One end of one of the line's two links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum End {
    /// The client's interface (client namespace), towards the proxy.
    Client,
    /// The proxy's interface towards the client (proxy namespace).
    ProxyToClient,
    /// The proxy's interface towards the upstream (proxy namespace).
    ProxyToUpstream,
    /// The upstream's interface (upstream namespace), towards the proxy.
    Upstream,
}

impl End {
    /// All four ends, client side first.
    pub const ALL: [End; 4] = [
        End::Client,
        End::ProxyToClient,
        End::ProxyToUpstream,
        End::Upstream,
    ];

    /// The end at the other side of the same veth.
    pub fn peer(self) -> End {
        match self {
            End::Client => End::ProxyToClient,
            End::ProxyToClient => End::Client,
            End::ProxyToUpstream => End::Upstream,
            End::Upstream => End::ProxyToUpstream,
        }
    }

    /// Index into the line's per-end tables.
    fn index(self) -> usize {
        match self {
            End::Client => 0,
            End::ProxyToClient => 1,
            End::ProxyToUpstream => 2,
            End::Upstream => 3,
        }
    }
}

/// Segmentation and receive offloads of one interface (what `ethtool -K IF tso/gso/gro` sets).
///
/// With TSO/GSO on, TCP hands a veth whole bursts of up to 64 KB as one skb, and a tc program on
/// the interface sees (and drops, or delays) them as one packet; tests that want per-segment
/// loss and reordering turn them off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// TCP segmentation offload.
    pub tso: bool,
    /// Generic segmentation offload. Off also sets the device's `gso_max_segs` to 1: the
    /// kernel's TCP builds GSO skbs whatever the device's features say (it segments them after
    /// tc egress), and only `gso_max_segs` limits them to one segment each. On restores 65535.
    pub gso: bool,
    /// Generic receive offload.
    pub gro: bool,
}

impl Offloads {
    /// Everything off: one MSS-sized packet per skb on the wire side.
    pub const OFF: Offloads = Offloads {
        tso: false,
        gso: false,
        gro: false,
    };
    /// Everything on (a veth's defaults).
    pub const ON: Offloads = Offloads {
        tso: true,
        gso: true,
        gro: true,
    };
}

/// Settings of one link (both of its ends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkSettings {
    /// The MTU of both ends; `None` leaves the veth default (1500).
    pub mtu: Option<u32>,
    /// Offloads of both ends; `None` leaves the defaults. Set a single end with
    /// [`Line::set_offloads`].
    pub offloads: Option<Offloads>,
}

/// How to build a [`Line`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineOptions {
    /// The client ↔ proxy link.
    pub client_link: LinkSettings,
    /// The proxy ↔ upstream link.
    pub upstream_link: LinkSettings,
}

/// The three namespaces and two veths; all removed when dropped.
#[derive(Debug)]
pub struct Line {
    prefix: String,
    octet: u8,
    /// Interface names by [`End::index`].
    interfaces: [String; 4],
    /// Interface indexes (in each end's own namespace) by [`End::index`].
    ifindexes: [u32; 4],
    client: Netns,
    proxy: Netns,
    upstream: Netns,
}

/// Longest prefix accepted: the longest interface name is the prefix and two letters, and
/// Linux allows 15 bytes.
pub const MAX_PREFIX: usize = 13;

impl Line {
    /// Builds the line named `prefix` (ASCII letters and digits, at most [`MAX_PREFIX`] of
    /// them, unique among the tests that run at once). A namespace left over by a killed run
    /// of the same process ID is removed first.
    ///
    /// Panics if a namespace cannot be created (as [`Netns::add`] does); other failures
    /// (`ip` refusing a link, an address, a setting) are errors, and what was made is removed.
    pub fn build(prefix: &str, options: &LineOptions) -> io::Result<Line> {
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX
            || !prefix.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("line prefix {prefix:?}: 1 to {MAX_PREFIX} ASCII letters or digits"),
            ));
        }
        // FNV-1a of the prefix picks the second octet (20..=219): parallel tests on other
        // prefixes get other subnets (not needed for isolation, each line has its own
        // namespaces, but it keeps captures and logs of parallel tests apart).
        let hash = prefix.bytes().fold(0x811c_9dc5_u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let octet = 20 + (hash % 200) as u8;
        let pid = std::process::id();
        let client = Netns::add(format!("wl{pid}{prefix}cli"));
        let proxy = Netns::add(format!("wl{pid}{prefix}prx"));
        let upstream = Netns::add(format!("wl{pid}{prefix}up"));
        let mut line = Line {
            prefix: prefix.to_owned(),
            octet,
            interfaces: [
                format!("{prefix}c"),
                format!("{prefix}pc"),
                format!("{prefix}pu"),
                format!("{prefix}u"),
            ],
            ifindexes: [0; 4],
            client,
            proxy,
            upstream,
        };
        // On an error `line` drops here and deletes the namespaces.
        line.wire(options)?;
        Ok(line)
    }

    /// Creates the veths, addresses, routes and settings.
    fn wire(&mut self, options: &LineOptions) -> io::Result<()> {
        for (near, far, settings) in [
            (End::Client, End::ProxyToClient, options.client_link),
            (End::ProxyToUpstream, End::Upstream, options.upstream_link),
        ] {
            ip(&[
                "-n",
                self.netns(near),
                "link",
                "add",
                "name",
                self.interface(near),
                "type",
                "veth",
                "peer",
                "name",
                self.interface(far),
                "netns",
                self.netns(far),
            ])?;
            for end in [near, far] {
                let (ns, dev) = (self.netns(end), self.interface(end));
                if let Some(mtu) = settings.mtu {
                    ip(&["-n", ns, "link", "set", "dev", dev, "mtu", &mtu.to_string()])?;
                }
                if let Some(offloads) = settings.offloads {
                    set_offloads(ns, dev, offloads)?;
                }
                ip(&["-n", ns, "addr", "add", &cidr_v4(self.v4(end)), "dev", dev])?;
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", self.v6(end)),
                    "dev",
                    dev,
                    "nodad",
                ])?;
                ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
            }
        }
        // The ends route everything through the proxy.
        for (end, via) in [
            (End::Client, End::ProxyToClient),
            (End::Upstream, End::ProxyToUpstream),
        ] {
            let ns = self.netns(end);
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &self.v4(via).to_string(),
            ])?;
            ip(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.v6(via).to_string(),
            ])?;
        }
        // The proxy terminates connections; it never forwards (new namespaces start with 0,
        // written anyway so the line does not depend on that default).
        in_netns(&self.proxy.name, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0")?;
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "0")
        })?;
        for end in End::ALL {
            self.ifindexes[end.index()] = ifindex(self.netns(end), self.interface(end))?;
        }
        Ok(())
    }

    /// The prefix the line was built with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The client's namespace name (`/run/netns/NAME`, for [`in_netns`] and `ip -n`).
    pub fn client_ns(&self) -> &str {
        &self.client.name
    }

    /// The proxy's namespace name.
    pub fn proxy_ns(&self) -> &str {
        &self.proxy.name
    }

    /// The upstream's namespace name.
    pub fn upstream_ns(&self) -> &str {
        &self.upstream.name
    }

    /// The namespace `end` lives in.
    pub fn netns(&self, end: End) -> &str {
        match end {
            End::Client => self.client_ns(),
            End::ProxyToClient | End::ProxyToUpstream => self.proxy_ns(),
            End::Upstream => self.upstream_ns(),
        }
    }

    /// The interface name of `end` (in its namespace).
    pub fn interface(&self, end: End) -> &str {
        &self.interfaces[end.index()]
    }

    /// The interface index of `end`, as its own namespace numbers it (for the proxy's ends:
    /// the index a program in the proxy namespace redirects to).
    pub fn ifindex(&self, end: End) -> u32 {
        self.ifindexes[end.index()]
    }

    /// The IPv4 address of `end` (a /24 shared with its peer).
    pub fn v4(&self, end: End) -> Ipv4Addr {
        let (subnet, host) = Self::numbers(end);
        Ipv4Addr::new(10, self.octet, subnet, host)
    }

    /// The IPv6 address of `end` (a /64 shared with its peer).
    pub fn v6(&self, end: End) -> Ipv6Addr {
        let (subnet, host) = Self::numbers(end);
        Ipv6Addr::new(
            0xfd00,
            0x88,
            u16::from(self.octet),
            u16::from(subnet),
            0,
            0,
            0,
            u16::from(host),
        )
    }

    /// The subnet (1: client link, 2: upstream link) and host number of `end`.
    fn numbers(end: End) -> (u8, u8) {
        match end {
            End::Client => (1, 2),
            End::ProxyToClient => (1, 1),
            End::ProxyToUpstream => (2, 1),
            End::Upstream => (2, 2),
        }
    }

    /// Sets the offloads of one end (see [`set_offloads`]).
    pub fn set_offloads(&self, end: End, offloads: Offloads) -> io::Result<()> {
        set_offloads(self.netns(end), self.interface(end), offloads)
    }

    /// Sets the MTU of one end (`ip link set dev IF mtu MTU`).
    pub fn set_mtu(&self, end: End, mtu: u32) -> io::Result<()> {
        ip(&[
            "-n",
            self.netns(end),
            "link",
            "set",
            "dev",
            self.interface(end),
            "mtu",
            &mtu.to_string(),
        ])
    }
}

fn cidr_v4(addr: Ipv4Addr) -> String {
    format!("{addr}/24")
}

/// Runs `ip ARGS`; an error with its stderr if it fails.
pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip").args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The index of `interface` in namespace `netns`.
pub fn ifindex(netns: &str, interface: &str) -> io::Result<u32> {
    let interface = interface.to_owned();
    in_netns(netns, move || ifindex_here(&interface))
}

/// The index of `interface` in the calling thread's namespace.
pub(crate) fn ifindex_here(interface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(io::Error::other(format!(
            "no interface {interface}: {}",
            io::Error::last_os_error()
        )))
    } else {
        Ok(index)
    }
}

/// `struct ifreq` with the `ifr_data` member (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// `struct ifreq` with the `ifr_mtu` member.
#[repr(C)]
struct IfreqInt {
    name: [libc::c_char; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// The legacy `ETHTOOL_S*` commands `ethtool -K` falls back to: TSO, GSO, GRO.
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

/// `ifr_name` of an ifreq for `interface` (at most 15 bytes).
fn ifr_name(interface: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    if interface.len() >= libc::IFNAMSIZ || interface.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {interface:?}"),
        ));
    }
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (to, from) in name.iter_mut().zip(interface.bytes()) {
        *to = from as libc::c_char;
    }
    Ok(name)
}

/// A datagram socket of the calling thread's namespace, for interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Switches TSO, GSO and GRO of `interface` in namespace `netns` (the `SIOCETHTOOL` requests
/// `ethtool -K IF tso X gso X gro X` makes), and its `gso_max_segs` with GSO (see
/// [`Offloads::gso`]).
pub fn set_offloads(netns: &str, interface: &str, offloads: Offloads) -> io::Result<()> {
    let name = ifr_name(interface)?;
    let dev = interface.to_owned();
    in_netns(netns, move || {
        let socket = ioctl_socket()?;
        for (cmd, on) in [
            (ETHTOOL_STSO, offloads.tso),
            (ETHTOOL_SGSO, offloads.gso),
            (ETHTOOL_SGRO, offloads.gro),
        ] {
            let mut value = EthtoolValue {
                cmd,
                data: u32::from(on),
            };
            let mut request = IfreqData {
                name,
                data: std::ptr::from_mut(&mut value).cast(),
                _pad: [0; 16],
            };
            // SAFETY: SIOCETHTOOL with an ifreq whose ifr_data points at a live ethtool_value,
            // the layout the kernel reads for the legacy set commands.
            let result = unsafe {
                libc::ioctl(
                    socket.as_raw_fd(),
                    libc::SIOCETHTOOL as _,
                    std::ptr::from_mut(&mut request),
                )
            };
            if result != 0 {
                let error = io::Error::last_os_error();
                return Err(io::Error::new(
                    error.kind(),
                    format!("ethtool command {cmd:#x} on {dev}: {error}"),
                ));
            }
        }
        Ok(())
    })?;
    let segs = if offloads.gso { "65535" } else { "1" };
    ip(&[
        "-n",
        netns,
        "link",
        "set",
        "dev",
        interface,
        "gso_max_segs",
        segs,
    ])
}

/// The MTU of `interface` in namespace `netns`.
pub fn mtu(netns: &str, interface: &str) -> io::Result<u32> {
    let name = ifr_name(interface)?;
    in_netns(netns, move || {
        let socket = ioctl_socket()?;
        let mut request = IfreqInt {
            name,
            value: 0,
            _pad: [0; 20],
        };
        // SAFETY: SIOCGIFMTU with a live ifreq; the kernel writes ifr_mtu.
        let result = unsafe {
            libc::ioctl(
                socket.as_raw_fd(),
                libc::SIOCGIFMTU as _,
                std::ptr::from_mut(&mut request),
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(request.value).map_err(|_| io::Error::other("negative MTU"))
    })
}
