//! The configuration types, their defaults and their serde form.
//!
//! Every field documents its default. Durations are written as float seconds,
//! `metrics.addr = ""` means "no metrics endpoint", and the three mount flags
//! of [`MountFlags`] are top-level keys (`nosuid = true`), like the other
//! mount options.

use std::borrow::Cow;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration of one ringfs mount.
///
/// Build it with [`crate::build`] or [`crate::from_toml_str`], which validate;
/// a value built in code can be checked with [`Config::validate`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "ConfigFile", into = "ConfigFile")]
pub struct Config {
    /// `source`: the backing directory whose contents the mount shows.
    /// Required, no default (the `Default` value is an empty path, which
    /// validation rejects). May be relative; the server canonicalizes it.
    pub source: PathBuf,
    /// `mountpoint`: where the file system is mounted. Required, no default
    /// (see `source`). Must differ from `source`.
    pub mountpoint: PathBuf,
    /// `allow_other`: let users other than the one mounting access the file
    /// system (needs `user_allow_other` in /etc/fuse.conf for non-root).
    /// Default `false`.
    pub allow_other: bool,
    /// `default_permissions`: let the kernel check permissions from the mode
    /// bits and POSIX ACLs it caches, instead of the server. Default `true`.
    /// `false` is refused together with `allow_other`: the kernel would then
    /// skip checks the server cannot make (cached path walks, device nodes,
    /// FIFOs).
    pub default_permissions: bool,
    /// `lsm_labels`: show and store the backing files' LSM security labels
    /// (`security.selinux`, `security.SMACK64*`, `security.apparmor`). Default `true`.
    /// `false` makes the mount a file system without labels: reading, setting or removing one
    /// answers EOPNOTSUPP and listings omit them (the backing files keep theirs), so label
    /// readers such as `ls -l` (which asks `security.selinux` of every name) stop asking
    /// after the first file: one GETXATTR round trip less per name. For hosts where no
    /// label-based LSM reads labels through this mount and nobody copies labels through it.
    /// `security.capability` and other `security.*` names are unaffected.
    pub lsm_labels: bool,
    /// `failover`: crash failover. The watchdog process holds the mount's connection and, when
    /// the server dies (SIGKILL, panic, OOM kill), starts a new server that takes the connection
    /// and the state over; the kernel resends the requests the dead server had taken
    /// (`FUSE_NOTIFY_RESEND`, Linux 6.9+). Classic /dev/fuse channel only: on FUSE over io_uring,
    /// or on a kernel without resend, the watchdog unmounts lazily as without it (said at
    /// start-up). Default `false` (docs/reliability.md, "Crash failover", says why).
    pub failover: bool,
    /// `ro`: mount read-only. Default `false`.
    pub ro: bool,
    /// `fsname`: the device name shown in /proc/mounts. Default `""`, which
    /// means the source path (see [`Config::fsname_or_source`]).
    pub fsname: String,
    /// `subtype`: the file-system type becomes `fuse.<subtype>`, or plain
    /// `fuse` when empty (as libfuse mounts without `-o subtype=`). Default
    /// `"ringfs"`. Letters, digits, `.`, `_` and `-` only.
    pub subtype: String,
    /// The `nosuid`, `nodev` and `noexec` top-level keys, passed to mount(2)
    /// as `MS_NOSUID` and friends. All default to `false`.
    pub mount_flags: MountFlags,
    /// `[cache]`: how long the kernel may trust what it cached.
    pub cache: CacheConfig,
    /// `[fuse]`: FUSE protocol limits negotiated at INIT.
    pub fuse: FuseConfig,
    /// `[transport]`: how requests travel between kernel and server.
    pub transport: TransportConfig,
    /// `[offload]`: work handed to the kernel.
    pub offload: OffloadConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[ebpf]`: eBPF helpers.
    pub ebpf: EbpfConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            source: PathBuf::new(),
            mountpoint: PathBuf::new(),
            allow_other: false,
            default_permissions: true,
            lsm_labels: true,
            failover: false,
            ro: false,
            fsname: String::new(),
            subtype: "ringfs".to_owned(),
            mount_flags: MountFlags::default(),
            cache: CacheConfig::default(),
            fuse: FuseConfig::default(),
            transport: TransportConfig::default(),
            offload: OffloadConfig::default(),
            metrics: MetricsConfig::default(),
            ebpf: EbpfConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Config {
    /// The device name for mount(2) and /proc/mounts: `fsname`, or the source
    /// path when `fsname` is empty.
    pub fn fsname_or_source(&self) -> Cow<'_, str> {
        if self.fsname.is_empty() {
            self.source.to_string_lossy()
        } else {
            Cow::Borrowed(&self.fsname)
        }
    }

    /// The file-system type for mount(2): `fuse.<subtype>`, or `fuse`.
    pub fn fstype(&self) -> String {
        if self.subtype.is_empty() {
            "fuse".to_owned()
        } else {
            format!("fuse.{}", self.subtype)
        }
    }
}

/// Generic mount flags recorded from the top-level keys `nosuid`, `nodev`,
/// `noexec`, `noatime`, `strictatime` and `nodiratime` (or the `-o` words of the
/// same names; `suid`, `dev`, `exec`, `atime`, `relatime` and `diratime` clear them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    /// `nosuid`: ignore set-user-id and set-group-id bits (`MS_NOSUID`).
    /// Default `false`.
    pub nosuid: bool,
    /// `nodev`: do not interpret device files (`MS_NODEV`). Default `false`.
    pub nodev: bool,
    /// `noexec`: do not allow executing programs (`MS_NOEXEC`). Default `false`.
    pub noexec: bool,
    /// `noatime`: access times are never updated, also for reads the kernel passes through
    /// to the backing file: the server reaches the backing directory through a private bind
    /// mount of it with the same access-time mode. Default `false` (the backing file
    /// system's own mount decides).
    pub noatime: bool,
    /// `strictatime`: every access updates the access time (as `noatime`, through a private
    /// mount of the backing directory; `noatime` wins if both are set). Default `false`.
    pub strictatime: bool,
    /// `nodiratime`: reading directories leaves their access times alone. Default `false`.
    pub nodiratime: bool,
}

/// `[cache]`: kernel cache lifetimes and how the cache is kept coherent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// `entry_timeout`: how long the kernel caches a name lookup, in seconds
    /// (integer or float, 0 to one year). Default `3600.0`: with `coherence = "watch"`
    /// changes made behind the mount's back are invalidated at once, so long is safe.
    #[serde(with = "seconds")]
    pub entry_timeout: Duration,
    /// `attr_timeout`: how long the kernel caches attributes, in seconds
    /// (0 to one year). Default `3600.0`.
    #[serde(with = "seconds")]
    pub attr_timeout: Duration,
    /// `negative_timeout`: how long the kernel caches "no such entry", in
    /// seconds (0 to one year; 0 disables negative caching). Default `3600.0`.
    #[serde(with = "seconds")]
    pub negative_timeout: Duration,
    /// `coherence`: how the cache learns of changes made behind its back.
    /// Default `"watch"` (with timeouts only, "ttl", set the timeouts short).
    pub coherence: CoherenceMode,
    /// `readdirplus`: whether directory listings carry every entry's attributes
    /// (READDIRPLUS, which fills the kernel's entry cache). Default `"always"`.
    pub readdirplus: ReaddirplusMode,
    /// `opendir_requests`: send OPENDIR and RELEASEDIR for every directory opened. Default
    /// `false`: with `coherence = "watch"` and `default_permissions` (where the server has
    /// nothing to check or remember at OPENDIR), directories open without a round trip
    /// (zero-message opendir: listings name the directory and the offset, and the kernel keeps
    /// cached listings across opens as it does with the watch anyway). Otherwise, or when the
    /// kernel lacks zero-message opendir, the requests are sent.
    pub opendir_requests: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            entry_timeout: Duration::from_secs(3600),
            attr_timeout: Duration::from_secs(3600),
            negative_timeout: Duration::from_secs(3600),
            coherence: CoherenceMode::default(),
            readdirplus: ReaddirplusMode::default(),
            opendir_requests: false,
        }
    }
}

/// `[fuse]`: limits negotiated with the kernel at FUSE_INIT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseConfig {
    /// `max_write`: largest write request in bytes; a multiple of 4096 from
    /// 4096 to 16 MiB. Default `1048576` (1 MiB).
    pub max_write: u32,
    /// `max_readahead`: largest kernel readahead in bytes, 0 to 16 MiB.
    /// Default `1048576` (1 MiB).
    pub max_readahead: u32,
    /// `max_background`: most background requests (readahead, async writes)
    /// the kernel keeps in flight, 1 to 65535. Default `64`.
    pub max_background: u16,
    /// `congestion_threshold`: background requests at which the kernel
    /// reports congestion, at most `max_background`; `0` means 3/4 of
    /// `max_background` (see [`FuseConfig::effective_congestion_threshold`]).
    /// Default `48`.
    pub congestion_threshold: u16,
    /// `writeback_cache`: let the kernel buffer writes (FUSE_WRITEBACK_CACHE).
    /// Excludes `offload.passthrough`. Default `false`.
    pub writeback_cache: bool,
    /// `export_handles`: file handles (`name_to_handle_at`/`open_by_handle_at`, NFS export of
    /// the mount) work; the server keeps up to this many inodes resolvable after the kernel
    /// has forgotten them (older handles then fail with ESTALE), 0 to 16777216. `0` refuses
    /// file handles (EOPNOTSUPP). Default `65536`.
    pub export_handles: u32,
    /// `export_state_dir`: where a mount's node ids wait for its next server, so file handles
    /// survive an unmount and mount (one root-only file per source and mount point; `*.state`
    /// files there not used for a week are deleted, so it should be a directory of its own).
    /// `""`: handles end with the server. Default
    /// `"/var/lib/ringfs/handles"`.
    pub export_state_dir: String,
}

impl Default for FuseConfig {
    fn default() -> Self {
        Self {
            max_write: 1 << 20,
            max_readahead: 1 << 20,
            max_background: 64,
            congestion_threshold: 48,
            writeback_cache: false,
            export_handles: 65536,
            export_state_dir: "/var/lib/ringfs/handles".into(),
        }
    }
}

impl FuseConfig {
    /// The congestion threshold to send to the kernel: the configured value,
    /// or 3/4 of `max_background` (at least 1) when it is 0.
    pub fn effective_congestion_threshold(&self) -> u16 {
        if self.congestion_threshold == 0 {
            // u32 arithmetic: 65535 * 3 does not fit in u16.
            let three_quarters = u32::from(self.max_background) * 3 / 4;
            u16::try_from(three_quarters).unwrap_or(u16::MAX).max(1)
        } else {
            self.congestion_threshold
        }
    }
}

/// `[transport]`: the request transport and its threads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// `mode`: which transport to use. Default `"auto"`.
    pub mode: TransportMode,
    /// `workers`: worker threads, at most 1024; `0` means one per online CPU
    /// (see [`TransportConfig::worker_count`]). Default `0`.
    pub workers: usize,
    /// `queue_depth`: io_uring entries per queue, 1 to 1024. Default `8`.
    pub queue_depth: u32,
    /// `inline_metadata`: let queue threads run metadata calls (stat, open, unlink, rename)
    /// as plain system calls when every file system under the backing directory is a local
    /// one, falling back to io_uring for a while after any slow call. `false` always uses
    /// io_uring (io-wq worker threads). Default `true`.
    pub inline_metadata: bool,
    /// `busy_poll_us`: microseconds an io_uring queue thread keeps looking for the next request
    /// after serving one, yielding the CPU to any runnable task meanwhile, before it sleeps:
    /// back-to-back requests then find their queue awake instead of paying a wake-up. 0 to
    /// 10 000; `0` sleeps at once. The classic /dev/fuse channel does not poll. Default `200`.
    pub busy_poll_us: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self { mode: TransportMode::default(), workers: 0, queue_depth: 8, inline_metadata: true, busy_poll_us: 200 }
    }
}

impl TransportConfig {
    /// The number of worker threads to start, given the number of online
    /// CPUs (which the caller finds out; this crate does not look).
    pub fn worker_count(&self, online_cpus: usize) -> usize {
        if self.workers == 0 {
            online_cpus.max(1)
        } else {
            self.workers
        }
    }
}

/// `[offload]`: work the kernel does on the server's behalf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OffloadConfig {
    /// `passthrough`: let the kernel read and write the backing files
    /// directly (FUSE_PASSTHROUGH) when it supports it. Excludes
    /// `fuse.writeback_cache`. Default `true`.
    pub passthrough: bool,
    /// `passthrough_exclude`: files never passed through, as `:`-separated glob patterns
    /// (`*`, `?`). A pattern without `/` matches the file name, one with `/` the path relative
    /// to `source`; e.g. `"*.sqlite:logs/*"`. Default `""` (none).
    pub passthrough_exclude: String,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        Self { passthrough: true, passthrough_exclude: String::new() }
    }
}

impl OffloadConfig {
    /// The exclusion patterns, split.
    pub fn exclude_patterns(&self) -> Vec<String> {
        self.passthrough_exclude.split(':').filter(|p| !p.is_empty()).map(str::to_string).collect()
    }
}

/// `[metrics]`: the Prometheus metrics endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `addr`: address and port to serve metrics on, or `""` to disable
    /// (`None`). Default `"127.0.0.1:9464"`.
    #[serde(with = "optional_addr")]
    pub addr: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { addr: Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9464))) }
    }
}

/// `[ebpf]`: eBPF programs loaded next to the mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EbpfConfig {
    /// `enable`: attach the eBPF accounting (fallbacks per operation, kernel-side latency)
    /// when the kernel allows it; the mount runs without it otherwise. Default `true`.
    pub enable: bool,
    /// `demand_tracing`: also trace the calls on the mount (system calls, page faults, io_uring
    /// reads/writes: demand and hit rates per class, bytes, and the call that caused each
    /// request; without it such requests are charged to `untraced`). Costs every system call on the machine ~0.1-0.3 µs and a 4 KiB
    /// page-cache read through the mount ~0.5 µs, so it is opt-in. Ignored when `enable` is
    /// false. Default `false`.
    pub demand_tracing: bool,
    /// `fuse_attach`: how the programs on the fuse tracepoints attach. Default `"auto"`.
    pub fuse_attach: FuseAttach,
}

impl Default for EbpfConfig {
    fn default() -> Self {
        Self { enable: true, demand_tracing: false, fuse_attach: FuseAttach::Auto }
    }
}

/// `[log]`: logging.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `level`: the most verbose level logged. Default `"info"`.
    pub level: LogLevel,
}

/// The error of parsing one of the keyword enums from a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseKeywordError {
    got: String,
    expected: &'static [&'static str],
}

impl fmt::Display for ParseKeywordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("must be one of ")?;
        for (i, name) in self.expected.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{name:?}")?;
        }
        write!(f, ", got {:?}", self.got)
    }
}

impl std::error::Error for ParseKeywordError {}

/// Defines an enum written as a lowercase keyword: `as_str`, `NAMES`,
/// `Display`, `FromStr` and serde all come from one list of names.
macro_rules! keyword_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every keyword, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The keyword as written in TOML and `-o` options.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Self::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseKeywordError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok(Self::$variant), )+
                    _ => Err(ParseKeywordError { got: s.to_owned(), expected: Self::NAMES }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

keyword_enum! {
    /// `cache.coherence`: how the kernel cache learns of changes made to the
    /// source directory by others.
    pub enum CoherenceMode {
        /// `"ttl"`: trust cached entries until their timeouts expire.
        Ttl = "ttl",
        /// `"watch"`: also watch the source and invalidate on change (fanotify on the
        /// backing file system, inotify on each known directory where fanotify is unavailable).
        #[default]
        Watch = "watch",
        /// `"inotify"`: like `"watch"`, always with inotify.
        Inotify = "inotify",
    }
}

keyword_enum! {
    /// `cache.readdirplus`: when directory listings carry attributes (READDIRPLUS).
    pub enum ReaddirplusMode {
        /// `"always"`: every chunk of a listing is a READDIRPLUS, so a `find`, `ls -l` or
        /// `du` costs one request per chunk instead of one LOOKUP per name.
        #[default]
        Always = "always",
        /// `"auto"`: the kernel's FUSE_READDIRPLUS_AUTO: READDIRPLUS for a directory's first
        /// chunk and after a lookup in it, plain READDIR otherwise (cheaper for a bare `ls` of
        /// a large directory; `find` then looks most names up one by one).
        Auto = "auto",
        /// `"off"`: plain READDIR only.
        Off = "off",
    }
}

keyword_enum! {
    /// `transport.mode`: the request transport.
    pub enum TransportMode {
        /// `"auto"`: io_uring when the kernel offers FUSE-over-io_uring,
        /// else /dev/fuse reads and writes.
        #[default]
        Auto = "auto",
        /// `"uring"`: FUSE-over-io_uring only; fail if unavailable.
        Uring = "uring",
        /// `"dev-fuse"`: classic read(2)/write(2) on /dev/fuse.
        DevFuse = "dev-fuse",
    }
}

keyword_enum! {
    /// `ebpf.fuse_attach`: how the programs on the fuse tracepoints (`fuse_request_send`,
    /// `fuse_request_end`) attach.
    pub enum FuseAttach {
        /// `"auto"`: `tp_btf`, and `raw_tp` where that cannot attach (FUSE built as a module).
        #[default]
        Auto = "auto",
        /// `"raw_tp"`: always `raw_tp` (tests of the fallback; a kernel whose `tp_btf` fails).
        RawTp = "raw_tp",
    }
}

keyword_enum! {
    /// `log.level`: the most verbose level logged.
    pub enum LogLevel {
        /// `"error"`
        Error = "error",
        /// `"warn"`
        Warn = "warn",
        /// `"info"`
        #[default]
        Info = "info",
        /// `"debug"`
        Debug = "debug",
        /// `"trace"`
        Trace = "trace",
    }
}

/// The file form of [`Config`]: flat top-level keys (the mount flags are not
/// a table) and paths as strings, so serialization cannot fail.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConfigFile {
    source: String,
    mountpoint: String,
    allow_other: bool,
    default_permissions: bool,
    lsm_labels: bool,
    failover: bool,
    ro: bool,
    nosuid: bool,
    nodev: bool,
    noexec: bool,
    noatime: bool,
    strictatime: bool,
    nodiratime: bool,
    fsname: String,
    subtype: String,
    cache: CacheConfig,
    fuse: FuseConfig,
    transport: TransportConfig,
    offload: OffloadConfig,
    metrics: MetricsConfig,
    ebpf: EbpfConfig,
    log: LogConfig,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Config::default().into()
    }
}

impl From<Config> for ConfigFile {
    fn from(c: Config) -> Self {
        Self {
            // Validation rejects non-UTF-8 paths before anyone relies on this.
            source: c.source.to_string_lossy().into_owned(),
            mountpoint: c.mountpoint.to_string_lossy().into_owned(),
            allow_other: c.allow_other,
            default_permissions: c.default_permissions,
            lsm_labels: c.lsm_labels,
            failover: c.failover,
            ro: c.ro,
            nosuid: c.mount_flags.nosuid,
            nodev: c.mount_flags.nodev,
            noexec: c.mount_flags.noexec,
            noatime: c.mount_flags.noatime,
            strictatime: c.mount_flags.strictatime,
            nodiratime: c.mount_flags.nodiratime,
            fsname: c.fsname,
            subtype: c.subtype,
            cache: c.cache,
            fuse: c.fuse,
            transport: c.transport,
            offload: c.offload,
            metrics: c.metrics,
            ebpf: c.ebpf,
            log: c.log,
        }
    }
}

impl From<ConfigFile> for Config {
    fn from(f: ConfigFile) -> Self {
        Self {
            source: f.source.into(),
            mountpoint: f.mountpoint.into(),
            allow_other: f.allow_other,
            default_permissions: f.default_permissions,
            lsm_labels: f.lsm_labels,
            failover: f.failover,
            ro: f.ro,
            fsname: f.fsname,
            subtype: f.subtype,
            mount_flags: MountFlags {
                nosuid: f.nosuid,
                nodev: f.nodev,
                noexec: f.noexec,
                noatime: f.noatime,
                strictatime: f.strictatime,
                nodiratime: f.nodiratime,
            },
            cache: f.cache,
            fuse: f.fuse,
            transport: f.transport,
            offload: f.offload,
            metrics: f.metrics,
            ebpf: f.ebpf,
            log: f.log,
        }
    }
}

/// Durations as seconds: integer or float in, float out.
mod seconds {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(SecondsVisitor)
    }

    struct SecondsVisitor;

    impl Visitor<'_> for SecondsVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of seconds >= 0")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v).map(Duration::from_secs).map_err(|_| E::custom("must be a number of seconds >= 0"))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
            Duration::try_from_secs_f64(v).map_err(|_| E::custom("must be a number of seconds >= 0"))
        }
    }
}

/// `Option<SocketAddr>` as a string, `""` for `None`.
mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| serde::de::Error::custom(format!("not an address: {text:?}")))
    }
}
