//! The system calls std does not wrap: a listener with a deep backlog, `send(MSG_MORE)`,
//! `sendfile(2)` and the kTLS socket options. Every `unsafe` block of the crate is here.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

/// `include/uapi/linux/tls.h`: the socket options of level `SOL_TLS`.
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
/// `TLS_1_3_VERSION` (0x0304, the record-layer version of RFC 8446 section 5.1 as the
/// kernel names it) and `TLS_CIPHER_AES_GCM_128`.
pub const TLS_1_3_VERSION: u16 = 0x0304;
pub const TLS_CIPHER_AES_GCM_128: u16 = 51;

/// `struct tls12_crypto_info_aes_gcm_128` (`include/uapi/linux/tls.h`; used for TLS 1.3 too):
/// the 12-byte AEAD nonce base is split into `salt` (first 4 bytes) and `iv` (last 8), and
/// `rec_seq` is the next record's sequence number, big-endian (RFC 8446 section 5.3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TlsCryptoInfoAesGcm128 {
    pub version: u16,
    pub cipher_type: u16,
    pub iv: [u8; 8],
    pub key: [u8; 16],
    pub salt: [u8; 4],
    pub rec_seq: [u8; 8],
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A listening TCP socket on `0.0.0.0:port` with `SO_REUSEADDR` and a backlog of `backlog`
/// (std's `TcpListener::bind` fixes it at 128, short of the benchmark's 1024 clients
/// connecting at once; the kernel caps it at `net.core.somaxconn`, 4096 on 6.1).
pub fn listen(port: u16, backlog: i32) -> io::Result<TcpListener> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a socket this function just created and owns; the listener takes it
    // over here, so it is closed on every error path below.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: the option value points at a live c_int of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::UNSPECIFIED).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a live sockaddr_in of the size passed.
    check(unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on the socket we own.
    check(unsafe { libc::listen(fd, backlog) })?;
    Ok(listener)
}

/// `send(2)` with `MSG_MORE`: the response header waits for the body that follows (with
/// kTLS too, where it joins the body's first record) instead of going out in a segment (or
/// record) of its own, as `TCP_CORK` would arrange.
pub fn send_more(stream: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of the length passed; the fd is the stream's.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_MORE | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// `sendfile(2)` of `len` bytes of `file` from offset 0 to `stream`, in as many calls as the
/// kernel needs.
pub fn sendfile_all(stream: &TcpStream, file: &File, len: u64) -> io::Result<()> {
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        let left = (len - offset as u64).min(1 << 30) as usize;
        // SAFETY: both fds are open for the call; `offset` is a live off_t the kernel
        // advances.
        let n = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sendfile: file shorter than its size",
            ));
        }
    }
    Ok(())
}

fn setsockopt_bytes(
    stream: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    // SAFETY: `value` is a live byte slice of the length passed.
    check(unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Attach the kernel's TLS upper-layer protocol to the connection (`TCP_ULP` "tls", which
/// needs `tls.ko`) and hand it the keys for both directions (Documentation/networking/tls.rst).
pub fn enable_ktls(
    stream: &TcpStream,
    tx: &TlsCryptoInfoAesGcm128,
    rx: &TlsCryptoInfoAesGcm128,
) -> io::Result<()> {
    setsockopt_bytes(stream, libc::SOL_TCP, libc::TCP_ULP, b"tls")?;
    for (name, info) in [(TLS_TX, tx), (TLS_RX, rx)] {
        // SAFETY: `TlsCryptoInfoAesGcm128` is a repr(C) struct of plain bytes and u16s with
        // no padding (2+2+8+16+4+8 = 40 bytes, the kernel's size); viewing it as bytes for
        // the length of the struct is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (info as *const TlsCryptoInfoAesGcm128).cast::<u8>(),
                std::mem::size_of::<TlsCryptoInfoAesGcm128>(),
            )
        };
        setsockopt_bytes(stream, libc::SOL_TLS, name, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn crypto_info_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<super::TlsCryptoInfoAesGcm128>(), 40);
    }
}
