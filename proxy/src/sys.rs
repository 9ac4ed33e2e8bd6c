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

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread and received synchronously.
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
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
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
