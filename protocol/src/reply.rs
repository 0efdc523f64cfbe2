//! Reply encoding (being written).
use crate::fs::{DirentType, Entry};

/// Encodes one dirent; None when it does not fit.
pub fn encode_dirent(
    _buf: &mut [u8],
    _ino: u64,
    _off: u64,
    _kind: DirentType,
    _name: &[u8],
) -> Option<usize> {
    None
}
/// Size of one direntplus record.
pub fn direntplus_size(namelen: usize) -> usize {
    (152 + namelen + 7) & !7
}
/// Encodes one direntplus; None when it does not fit.
pub fn encode_direntplus(
    _buf: &mut [u8],
    _e: &Entry,
    _off: u64,
    _kind: DirentType,
    _name: &[u8],
) -> Option<usize> {
    None
}
