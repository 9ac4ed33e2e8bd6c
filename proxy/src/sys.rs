//! Every raw system call of the proxy outside io_uring and aya, each written once with the
//! reason it is sound. The rest of the crate calls these and holds no `unsafe` for sockets.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_len(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// A non-blocking `recv` (the proxy's sockets stay blocking for io_uring's sake).
pub fn recv(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of `buffer.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT,
        )
    };
    check_len(n)
}

/// A non-blocking `recv(MSG_PEEK)`: the bytes stay queued.
pub fn peek(fd: RawFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: as in `recv`.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    check_len(n)
}

/// Best-effort, non-blocking send of a few bytes on a socket with nothing else in flight (an
/// alert, an error answer): if the socket cannot take them now, the peer sees a close.
pub fn send_now(fd: RawFd, bytes: &[u8]) {
    if bytes.is_empty() || fd < 0 {
        return;
    }
    // SAFETY: `bytes` is valid for reads of its length for the duration of the call.
    unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// `shutdown(fd, SHUT_WR)`: passes a FIN on. Errors (peer already gone) change nothing.
pub fn shutdown_write(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: plain syscall on a descriptor the caller owns.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    }
}

/// `SO_RCVLOWAT`: poll reports the socket readable only once `bytes` are queued. Setting it
/// also re-runs the socket's receive path (on a spliced socket: the verdict program, for bytes
/// queued before the socket entered the map), from the calling thread and without the socket
/// lock: use it as the hand-off kick only, never to serialize with the program.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt with a valid int option value.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

/// The socket's cookie (`SO_COOKIE`): the key of its map entries.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes; SO_COOKIE writes a u64.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    })?;
    Ok(cookie)
}

/// `TCP_INFO` of a socket.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    })?;
    Ok(info)
}

/// Whether the connection is gone (TCP state CLOSE: reset, or closed both ways).
pub fn is_closed(fd: BorrowedFd<'_>) -> bool {
    // TCP_CLOSE in the kernel's enum (include/net/tcp_states.h).
    const TCP_CLOSE: u8 = 7;
    tcp_info(fd).is_ok_and(|info| info.tcpi_state == TCP_CLOSE)
}

/// Bytes ever written into the socket's send queue: acked bytes plus what is still queued
/// (`TCP_INFO.tcpi_bytes_acked + SIOCOUTQ`). On a spliced socket, what the kernel pushed in.
pub fn queued_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let info = tcp_info(fd)?;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) })?;
    Ok(info.tcpi_bytes_acked + u64::try_from(outq).unwrap_or(0))
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (wakes whoever polls it).
pub fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter (after a wake-up was seen).
pub fn clear(fd: RawFd) {
    let mut counter = 0u64;
    // SAFETY: reading 8 bytes into a valid u64 from a non-blocking eventfd.
    unsafe { libc::read(fd, (&mut counter as *mut u64).cast(), 8) };
}

/// Waits up to `timeout` for `fd` to be readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, ms) > 0 }
}

/// Pins the calling thread to the `index`-th CPU this process may use (modulo their number).
pub fn pin_to_cpu(index: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET/sched_*affinity work on this thread.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &allowed))
            .collect();
        let Some(&cpu) = cpus.get(index % cpus.len().max(1)) else {
            return;
        };
        let mut only: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut only);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &only) != 0 {
            tracing::debug!(index, cpu, "could not pin the worker");
        }
    }
}

/// Lifts the soft `RLIMIT_NOFILE` to the hard limit; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

/// SIGTERM, SIGINT, SIGHUP and SIGUSR2, blocked in every thread and received synchronously.
#[derive(Debug)]
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Blocks the signals in this thread (threads spawned later inherit the mask).
    pub fn block_termination() -> io::Result<SignalSet> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it; pthread_sigmask
        // only changes this thread's mask.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR2] {
                libc::sigaddset(&mut set, signal);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            Ok(SignalSet { set })
        }
    }

    /// The next pending signal, waiting at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `self.set` is an initialised signal set; a null siginfo pointer is allowed.
        let signal = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (signal > 0).then_some(signal)
    }
}

// ---- eBPF attachment ------------------------------------------------------------------------

/// `BPF_PROG_ATTACH` of an `sk_skb/stream_verdict` program to a sockmap or sockhash: the map
/// holds the program from then on, whatever happens to the process (aya attaches through a
/// link on Linux 6.10+, which detaches when its last descriptor closes).
pub fn attach_stream_verdict(program: BorrowedFd<'_>, map: BorrowedFd<'_>) -> io::Result<()> {
    /// `BPF_PROG_ATTACH` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
    const BPF_PROG_ATTACH: libc::c_long = 8;
    /// `BPF_SK_SKB_STREAM_VERDICT` (`enum bpf_attach_type`).
    const BPF_SK_SKB_STREAM_VERDICT: u32 = 5;
    /// The attach part of `union bpf_attr`: target, program, type, flags, then fields this
    /// call leaves zero (the kernel checks that what it does not read is zero).
    #[repr(C)]
    struct AttachAttr {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
        replace_bpf_fd: u32,
        unused: [u32; 11],
    }
    let attr = AttachAttr {
        target_fd: map.as_raw_fd() as u32,
        attach_bpf_fd: program.as_raw_fd() as u32,
        attach_type: BPF_SK_SKB_STREAM_VERDICT,
        attach_flags: 0,
        replace_bpf_fd: 0,
        unused: [0; 11],
    };
    // SAFETY: bpf(2) reads `size_of::<AttachAttr>()` bytes of a valid, initialised value; both
    // descriptors are borrowed and open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const AttachAttr,
            std::mem::size_of::<AttachAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- descriptors passed to a successor (binary upgrade) -------------------------------------

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (message boundaries kept, in order, and
/// a peer that exits reads as end of stream), both close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets or clears `FD_CLOEXEC` (a descriptor a child must inherit has it cleared).
pub fn set_cloexec(fd: BorrowedFd<'_>, cloexec: bool) -> io::Result<()> {
    let flags = if cloexec { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on a descriptor we borrow; no memory is passed.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags) }.min(0))
}

/// Sends `bytes` as one message on the Unix socket `socket` with `fds` attached (`SCM_RIGHTS`:
/// the receiver gets its own descriptors for the same open files). Blocks until sent.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as libc::c_uint) } as usize;
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    if !raw.is_empty() {
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes, room for one header and `payload`
        // bytes of data (CMSG_SPACE); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload as libc::c_uint) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                payload,
            );
        }
    }
    // SAFETY: `message` points at valid buffers (above); the descriptors are borrowed, open.
    let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &message, libc::MSG_NOSIGNAL) };
    let sent = check_len(n)?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "message cut short",
        ));
    }
    Ok(())
}

/// Receives one message from the Unix socket `socket` into `buffer`, with the descriptors it
/// carries (close-on-exec). `Ok((0, []))` at end of stream. A message or a descriptor list
/// larger than the room given is an error (its descriptors are closed, not leaked).
pub fn recv_with_fds(
    socket: BorrowedFd<'_>,
    buffer: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let payload = MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as libc::c_uint) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the recvmsg call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space as _;
    // SAFETY: `message` points at valid, writable buffers of the lengths it states.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut message, libc::MSG_CMSG_CLOEXEC) };
    let len = check_len(n)?;
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG_* walk stays inside
    // it, and each SCM_RIGHTS entry holds descriptors that are now ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - (data as usize - header as usize);
                for index in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(index));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if message.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message larger than expected",
        ));
    }
    Ok((len, fds))
}

// ---- credentials and capabilities (used once, at start, by `privileges`) ----------------

/// A user database entry: its id and primary group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserEntry {
    /// The user id.
    pub uid: u32,
    /// The primary group id.
    pub gid: u32,
}

/// Calls a reentrant `get*_r` lookup with a growing buffer; `Ok(false)` when there is no entry.
fn lookup_with_buffer(
    mut call: impl FnMut(&mut [libc::c_char], &mut bool) -> libc::c_int,
) -> io::Result<bool> {
    let mut buffer = vec![0 as libc::c_char; 1024];
    loop {
        let mut found = false;
        match call(&mut buffer, &mut found) {
            0 => return Ok(found),
            libc::ERANGE if buffer.len() < (1 << 20) => {
                let grown = buffer.len() * 2;
                buffer.resize(grown, 0);
            }
            // getpwnam_r(3): these also mean "no such entry" on some databases.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(false),
            error => return Err(io::Error::from_raw_os_error(error)),
        }
    }
}

/// `getpwnam_r`: the user named `name` (`None`: no such user).
pub fn user_by_name(name: &str) -> io::Result<Option<UserEntry>> {
    let name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `name` is NUL-terminated; the other pointers come from `user_lookup`, valid for
    // the call.
    user_lookup(|entry, buffer, length, result| unsafe {
        libc::getpwnam_r(name.as_ptr(), entry, buffer, length, result)
    })
}

/// `getpwuid_r`: the user with `uid` (`None`: not in the database).
pub fn user_by_id(uid: u32) -> io::Result<Option<UserEntry>> {
    // SAFETY: the pointers come from `user_lookup`, valid for the call.
    user_lookup(|entry, buffer, length, result| unsafe {
        libc::getpwuid_r(uid, entry, buffer, length, result)
    })
}

/// One `getpw*_r` call (`call(entry, buffer, length, result)`), with a buffer grown until it
/// fits.
fn user_lookup(
    mut call: impl FnMut(
        *mut libc::passwd,
        *mut libc::c_char,
        usize,
        *mut *mut libc::passwd,
    ) -> libc::c_int,
) -> io::Result<Option<UserEntry>> {
    // SAFETY: passwd is plain data; zeroed is a valid value that getpw*_r overwrites.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let found = lookup_with_buffer(|buffer, found| {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // `entry` and `result` are writable, `buffer` is writable for its length.
        let rc = call(&mut entry, buffer.as_mut_ptr(), buffer.len(), &mut result);
        *found = !result.is_null();
        rc
    })?;
    Ok(found.then_some(UserEntry {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    }))
}

/// `getgrnam_r`: the id of the group named `name` (`None`: no such group).
pub fn group_by_name(name: &str) -> io::Result<Option<u32>> {
    let name = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: group is plain data; zeroed is a valid value that getgrnam_r overwrites.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let found = lookup_with_buffer(|buffer, found| {
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in `user_by_name`.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut result,
            )
        };
        *found = !result.is_null();
        rc
    })?;
    Ok(found.then_some(entry.gr_gid))
}

/// Real, effective and saved user ids, then the same for groups.
pub fn ids() -> ([u32; 3], [u32; 3]) {
    let (mut ruid, mut euid, mut suid) = (0, 0, 0);
    let (mut rgid, mut egid, mut sgid) = (0, 0, 0);
    // SAFETY: getresuid/getresgid write three ids through valid pointers and cannot fail so.
    unsafe {
        libc::getresuid(&mut ruid, &mut euid, &mut suid);
        libc::getresgid(&mut rgid, &mut egid, &mut sgid);
    }
    ([ruid, euid, suid], [rgid, egid, sgid])
}

/// The supplementary groups of this process.
pub fn supplementary_groups() -> io::Result<Vec<u32>> {
    // SAFETY: a count of 0 asks for the number of groups only.
    let count = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups = vec![0; usize::try_from(count).map_err(|_| io::Error::last_os_error())?];
    // SAFETY: `groups` is writable for `count` ids.
    let count = unsafe { libc::getgroups(count, groups.as_mut_ptr()) };
    groups.truncate(usize::try_from(count).map_err(|_| io::Error::last_os_error())?);
    Ok(groups)
}

/// `setgroups(0, NULL)`: no supplementary groups.
pub fn clear_supplementary_groups() -> io::Result<()> {
    // SAFETY: an empty list needs no pointer.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })
}

/// `setresgid(gid, gid, gid)`. glibc applies it to every thread of the process.
pub fn set_gid(gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::setresgid(gid, gid, gid) })
}

/// `setresuid(uid, uid, uid)`. glibc applies it to every thread of the process.
pub fn set_uid(uid: u32) -> io::Result<()> {
    // SAFETY: plain syscall.
    check(unsafe { libc::setresuid(uid, uid, uid) })
}

/// `prctl(PR_SET_KEEPCAPS)`: whether the permitted capabilities survive leaving uid 0.
pub fn set_keep_capabilities(keep: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) })
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: no `execve` can grant privileges again (setuid bits, file
/// capabilities). Irreversible; inherited by threads created later.
pub fn set_no_new_privileges() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// `prctl(PR_CAPBSET_DROP, cap)`: `cap` leaves the bounding set (needs CAP_SETPCAP).
pub fn drop_bounding_capability(cap: u32) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) })
}

/// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)`: no ambient capabilities.
pub fn clear_ambient_capabilities() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    })
}

/// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`).
pub fn last_capability() -> io::Result<u32> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// A thread's capability sets, one bit per capability number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapabilitySets {
    /// What the thread may use now.
    pub effective: u64,
    /// What it may make effective.
    pub permitted: u64,
    /// What may pass through `execve`.
    pub inheritable: u64,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `capget(2)` on the calling thread.
pub fn capabilities() -> io::Result<CapabilitySets> {
    let mut header = CapabilityHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapabilityData::default(); 2];
    // SAFETY: a version 3 header and two data structs, both valid for writes.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| u64::from(low) | (u64::from(high) << 32);
    Ok(CapabilitySets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
        inheritable: join(data[0].inheritable, data[1].inheritable),
    })
}

/// `capset(2)` on the calling thread (threads created later inherit the sets).
pub fn set_capabilities(sets: CapabilitySets) -> io::Result<()> {
    let mut header = CapabilityHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |bits: u64, high: bool| (if high { bits >> 32 } else { bits }) as u32;
    let data = [false, true].map(|high| CapabilityData {
        effective: half(sets.effective, high),
        permitted: half(sets.permitted, high),
        inheritable: half(sets.inheritable, high),
    });
    // SAFETY: a version 3 header (valid for writes: the kernel may store its version) and two
    // data structs valid for reads.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::os::fd::AsFd as _;

    #[test]
    fn peek_leaves_bytes_that_recv_then_takes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let fd = server.as_raw_fd();
        let mut buffer = [0u8; 16];
        let mut peeked = 0;
        for _ in 0..100 {
            match peek(fd, &mut buffer) {
                Ok(n) if n == 5 => {
                    peeked = n;
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        assert_eq!(peeked, 5);
        assert_eq!(recv(fd, &mut buffer).unwrap(), 5);
        assert_eq!(&buffer[..5], b"hello");
        assert_eq!(
            recv(fd, &mut buffer).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(socket_cookie(server.as_fd()).unwrap() != 0);
        assert!(!is_closed(server.as_fd()));
    }
}
