//! Messages with descriptors over a unix socket (`SCM_RIGHTS`): how the watchdog is armed with
//! the connection and how a live upgrade hands a mount to the next server. One message is one
//! `sendmsg`/`recvmsg`: some bytes and at most a given number of descriptors.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags,
};

/// Sends `data` and the descriptors `fds` (open for the duration of the call) as one message;
/// a closed peer is an error (`EPIPE`), never a signal. Retries on `EINTR`.
pub fn send(sock: impl AsFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    // SAFETY: the caller passes descriptors that stay open while this call runs (documented);
    // the borrows end with it.
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|&fd| unsafe { BorrowedFd::borrow_raw(fd) }).collect();
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors for one message"));
    }
    loop {
        match rustix::net::sendmsg(&sock, &[IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message of at most `max_data` bytes (empty: the peer is gone) and its
/// descriptors (close-on-exec), at most `max_fds` of them; blocks. A message whose
/// descriptors did not all fit is an error (the ones that came are closed).
pub fn recv(sock: impl AsFd, max_data: usize, max_fds: usize) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = vec![0u8; max_data];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(max_fds.max(1)))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(&sock, &mut [IoSliceMut::new(&mut data)], &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    data.truncate(got.bytes);
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "descriptors truncated"));
    }
    Ok((data, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    fn file() -> std::fs::File {
        rustix::fs::memfd_create("fdpass-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap().into()
    }

    fn pair() -> (OwnedFd, OwnedFd) {
        use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
        socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None).unwrap()
    }

    #[test]
    fn bytes_and_descriptors_arrive_together() {
        let (a, b) = pair();
        let mut f = file();
        f.write_all(b"passed").unwrap();
        send(&a, b"hello", &[f.as_raw_fd()]).unwrap();
        drop(f);
        let (data, fds) = recv(&b, 64, 4).unwrap();
        assert_eq!(data, b"hello");
        assert_eq!(fds.len(), 1);
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "passed");
        send(&a, b"", &[]).unwrap();
        let (data, fds) = recv(&b, 64, 4).unwrap();
        assert!(data.is_empty() && fds.is_empty());
    }

    #[test]
    fn more_descriptors_than_room_is_an_error() {
        let (a, b) = pair();
        let files: Vec<std::fs::File> = (0..8).map(|_| file()).collect();
        let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        send(&a, b"x", &raw).unwrap();
        let e = recv(&b, 64, 2).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        drop(a);
        let (data, fds) = recv(&b, 64, 2).unwrap();
        assert!(data.is_empty() && fds.is_empty(), "the peer is gone: an empty message");
    }
}
