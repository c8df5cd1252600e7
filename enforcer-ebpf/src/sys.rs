//! The few kernel calls aya 0.14 does not offer: `BPF_PROG_TEST_RUN` on a tc program, the
//! RCU barrier behind a version flip, and mounting bpffs. All `unsafe` of the crate is here.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `union bpf_attr` is larger than any command's part of it; the kernel wants the rest zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }

    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, writable `bpf_attr`-sized buffer that outlives the call;
    // every pointer stored in it points into memory the caller keeps alive.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `BPF_MAP_CREATE` of `map_type` with key and value sizes, capacity, flags, and (for maps
/// of maps) the inner map's template fd, else 0.
fn map_create(
    map_type: u32,
    key: u32,
    value: u32,
    max: u32,
    flags: u32,
    inner: i32,
) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.put_u32(0, map_type)
        .put_u32(4, key)
        .put_u32(8, value)
        .put_u32(12, max)
        .put_u32(16, flags)
        .put_u32(20, inner as u32);
    let fd = bpf(BPF_MAP_CREATE, &mut a)? as i32;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until every BPF program that may have read a map before this call has finished.
///
/// The kernel promises exactly that after an update of a map-of-maps
/// (`maybe_wait_bpf_programs`: a `synchronize_rcu`). tc programs run inside an RCU read
/// section, so after the selector flips and this returns, no packet still reads the old slot.
pub struct Barrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl Barrier {
    pub fn new() -> io::Result<Self> {
        let inner = map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0, 0)?;
        let outer = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 1, 0, inner.as_raw_fd())?;
        Ok(Barrier { outer, inner })
    }

    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut a = Attr::new();
        a.put_u32(0, self.outer.as_raw_fd() as u32)
            .put_u64(8, &key as *const u32 as u64)
            .put_u64(16, &value as *const u32 as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
    }
}

/// What one `BPF_PROG_TEST_RUN` of a tc program returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRun {
    pub retval: u32,
    /// `skb->mark` after the run.
    pub mark: u32,
    /// Mean time of one run of the program, as the kernel measured it (ns).
    pub duration_ns: u32,
}

/// Offsets in `struct __sk_buff` (uapi, stable).
const SKB_MARK: usize = 8;
const SKB_INGRESS_IFINDEX: usize = 36;
const SKB_SIZE: usize = 192;

/// Runs a tc program once on `frame` (an Ethernet frame) with the given mark and ingress
/// interface (0: generated on this host).
pub fn test_run(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    mark: u32,
    ingress_ifindex: u32,
) -> io::Result<TestRun> {
    test_run_repeat(prog, frame, mark, ingress_ifindex, 1)
}

/// [`test_run`], the program run `repeat` times on the same packet (for timing).
pub fn test_run_repeat(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    mark: u32,
    ingress_ifindex: u32,
    repeat: u32,
) -> io::Result<TestRun> {
    let mut ctx_in = [0u8; SKB_SIZE];
    ctx_in[SKB_MARK..SKB_MARK + 4].copy_from_slice(&mark.to_ne_bytes());
    ctx_in[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; SKB_SIZE];
    let mut out = vec![0u8; frame.len() + 256];
    let mut a = Attr::new();
    a.put_u32(0, prog.as_raw_fd() as u32)
        .put_u32(8, frame.len() as u32)
        .put_u32(12, out.len() as u32)
        .put_u64(16, frame.as_ptr() as u64)
        .put_u64(24, out.as_mut_ptr() as u64)
        .put_u32(32, repeat)
        .put_u32(40, SKB_SIZE as u32)
        .put_u32(44, SKB_SIZE as u32)
        .put_u64(48, ctx_in.as_ptr() as u64)
        .put_u64(56, ctx_out.as_mut_ptr() as u64);
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    Ok(TestRun {
        retval: a.u32_at(4),
        duration_ns: a.u32_at(36),
        mark: u32::from_ne_bytes(ctx_out[SKB_MARK..SKB_MARK + 4].try_into().expect("4 bytes")),
    })
}

/// Mounts a bpffs at `path` unless one is there already. `ip netns exec` remounts /sys, so
/// enforcers in network namespaces pin under a bpffs mounted elsewhere (shared by all of
/// them, each under its own node directory).
fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

pub fn ensure_bpffs(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)?;
    if is_bpffs(path)? {
        return Ok(());
    }
    let c = cpath(path)?;
    let fs = CString::new("bpf").expect("no NUL");
    // SAFETY: every argument is a valid NUL-terminated string or null.
    let r = unsafe { libc::mount(fs.as_ptr(), c.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = cpath(path)?;
    // SAFETY: `st` is written by statfs before it is read.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Interfaces of the current network namespace: (index, name).
pub fn interfaces() -> io::Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Whether the bpf() syscall works at all (a one-entry array, closed at once).
pub fn map_probe() -> io::Result<()> {
    map_create(BPF_MAP_TYPE_ARRAY, 4, 4, 1, 0, 0).map(drop)
}

/// Each map type the datapath declares, created small and closed.
pub fn map_type_probes() -> Vec<(&'static str, io::Result<()>)> {
    vec![
        (
            "hash",
            map_create(BPF_MAP_TYPE_HASH, 8, 4, 4, BPF_F_NO_PREALLOC, 0).map(drop),
        ),
        (
            "lru_hash",
            map_create(BPF_MAP_TYPE_LRU_HASH, 8, 8, 16, 0, 0).map(drop),
        ),
        // LPM keys: 4 bytes of prefix length, then data.
        (
            "lpm_trie",
            map_create(BPF_MAP_TYPE_LPM_TRIE, 8, 4, 4, BPF_F_NO_PREALLOC, 0).map(drop),
        ),
        (
            "percpu_array",
            map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, 0, 0).map(drop),
        ),
        ("array_of_maps", Barrier::new().map(drop)),
    ]
}

/// A netlink route socket subscribed to link events of the current network namespace, so
/// interfaces that appear between two versions (a new pod's veth) get the programs at once.
pub struct LinkWatch(OwnedFd);

const RTMGRP_LINK: u32 = 1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

fn netlink_socket(groups: u32, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket this function just created and owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; family and groups are then set.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: `addr` is a valid sockaddr_nl of the length passed.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Netlink messages in `buf`: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + 16 > buf.len() {
            return None;
        }
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
        if len < 16 || at + len > buf.len() {
            return None;
        }
        let payload = &buf[at + 16..at + len];
        at += (len + 3) & !3;
        Some((ty, payload))
    })
}

/// Route attributes in `buf`: (type without flags, data).
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes(buf[at..at + 2].try_into().expect("2 bytes")) as usize;
        let ty = u16::from_ne_bytes(buf[at + 2..at + 4].try_into().expect("2 bytes")) & 0x3fff;
        if len < 4 || at + len > buf.len() {
            return None;
        }
        let data = &buf[at + 4..at + len];
        at += (len + 3) & !3;
        Some((ty, data))
    })
}

/// One netlink dump (`ty` with a zeroed header of `hdr` bytes): every message's payload.
fn dump(ty: u16, hdr: usize) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let fd = netlink_socket(0, 0)?;
    let mut req = vec![0u8; 16 + hdr];
    let len = req.len() as u32;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&ty.to_ne_bytes());
    // NLM_F_REQUEST | NLM_F_DUMP
    req[6..8].copy_from_slice(&(0x1u16 | 0x300).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: `req` is readable for its length.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        for (t, payload) in messages(&buf[..n as usize]) {
            match t {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => out.push((t, payload.to_vec())),
            }
        }
    }
}

/// Whether an address message's address (IFA_ADDRESS, 1, or IFA_LOCAL, 2) is link-local:
/// 169.254/16 or fe80::/10.
fn link_local_only(family: u8, attrs_buf: &[u8]) -> bool {
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;
    attrs(attrs_buf)
        .filter(|(a, _)| *a == 1 || *a == 2)
        .map(|(_, d)| match (family, d.len()) {
            (AF_INET, 4) => d[0] == 169 && d[1] == 254,
            (AF_INET6, 16) => d[0] == 0xfe && d[1] & 0xc0 == 0x80,
            _ => false,
        })
        .next()
        .unwrap_or(false)
}

/// The links of the current network namespace as the pod classification needs them (kind,
/// master, whether they hold a global address).
pub fn links() -> io::Result<Vec<moat_dataplane::local::Link>> {
    let mut global = std::collections::BTreeSet::new();
    for (t, p) in dump(RTM_GETADDR, 8)? {
        // ifaddrmsg: family, prefix length, flags, scope, index.
        // Link-local addresses never count, whatever their scope: `ip addr add
        // 169.254.1.1/32` is scope global, and CNIs give pod veths exactly that as the
        // pods' gateway (the agent's watcher follows the same rule; see `Link::global_addr`).
        if t == RTM_NEWADDR && p.len() >= 8 && p[3] == 0 && !link_local_only(p[0], &p[8..]) {
            global.insert(u32::from_ne_bytes(p[4..8].try_into().expect("4 bytes")));
        }
    }
    let mut out = Vec::new();
    for (t, p) in dump(RTM_GETLINK, 16)? {
        if t != RTM_NEWLINK || p.len() < 16 {
            continue;
        }
        let index = u32::from_ne_bytes(p[4..8].try_into().expect("4 bytes"));
        let mut link = moat_dataplane::local::Link {
            index,
            name: String::new(),
            kind: String::new(),
            master: None,
            global_addr: global.contains(&index),
        };
        for (a, d) in attrs(&p[16..]) {
            match a {
                IFLA_IFNAME => {
                    link.name = String::from_utf8_lossy(d.split(|b| *b == 0).next().unwrap_or(d))
                        .into_owned()
                }
                IFLA_MASTER if d.len() >= 4 => {
                    link.master = Some(u32::from_ne_bytes(d[..4].try_into().expect("4 bytes")))
                }
                IFLA_LINKINFO => {
                    for (i, v) in attrs(d) {
                        if i == IFLA_INFO_KIND {
                            link.kind =
                                String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or(v))
                                    .into_owned();
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// A new descriptor of the object pinned at `pin`.
fn obj_get(pin: &Path) -> io::Result<OwnedFd> {
    let path = cpath(pin)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64);
    // SAFETY: the kernel returned a new descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(bpf(BPF_OBJ_GET, &mut attr)? as i32) })
}

/// The first 4-byte words of the object's `bpf_*_info`, in memory order (room for any
/// kernel's larger struct).
fn obj_info(fd: &OwnedFd) -> io::Result<[u32; 64]> {
    let mut info = [0u64; 32];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, std::mem::size_of_val(&info) as u32)
        .put_u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let mut words = [0u32; 64];
    for (i, w) in words.iter_mut().enumerate() {
        let b = info[i / 2].to_ne_bytes();
        let at = (i % 2) * 4;
        *w = u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    }
    Ok(words)
}

/// The interface a pinned TCX link is on: `Some(0)` once its device is gone (the link is
/// defunct, though its pin remains), `None` if the pin holds another kind of link.
pub fn tcx_link_ifindex(pin: &Path) -> io::Result<Option<u32>> {
    // `struct bpf_link_info`: type, id, prog_id, then the union (8-aligned, at 16), whose
    // `tcx` member starts with the ifindex.
    let info = obj_info(&obj_get(pin)?)?;
    Ok((info[0] == BPF_LINK_TYPE_TCX).then_some(info[4]))
}

/// The kernel's id of the map pinned at `pin` (`struct bpf_map_info`: type, then id): two
/// pins name one map when their ids are equal.
pub fn map_id(pin: &Path) -> io::Result<u32> {
    Ok(obj_info(&obj_get(pin)?)?[1])
}

/// The definition of the map pinned at `pin` (`struct bpf_map_info` after the id): type,
/// key size, value size, capacity, flags.
pub fn map_shape(pin: &Path) -> io::Result<[u32; 5]> {
    let i = obj_info(&obj_get(pin)?)?;
    Ok([i[0], i[2], i[3], i[4], i[5]])
}

/// Pins the object pinned at `from` at `to` as well: one object, two names.
pub fn pin_again(from: &Path, to: &Path) -> io::Result<()> {
    let fd = obj_get(from)?;
    let path = cpath(to)?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64)
        .put_u32(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Whether interface `index` exists in the current network namespace.
pub fn link_exists(index: u32) -> bool {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` is IF_NAMESIZE long, as if_indextoname requires.
    !unsafe { libc::if_indextoname(index, name.as_mut_ptr()) }.is_null()
}

impl LinkWatch {
    /// Subscribed to link and address events (an address can change a link's kind).
    pub fn new() -> io::Result<Self> {
        netlink_socket(
            RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR,
            libc::SOCK_NONBLOCK,
        )
        .map(LinkWatch)
    }

    /// Blocks until an event arrives (or `timeout` passes); whether a link appeared or changed.
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        r > 0 && self.changed()
    }

    /// Whether a link appeared or changed since the last call (never blocks). A lost event
    /// (the socket's buffer overran) counts as a change.
    pub fn changed(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut changed = false;
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        changed = true;
                        continue;
                    }
                    _ => return changed,
                }
            }
            if n == 0 {
                return changed;
            }
            if messages(&buf[..n as usize])
                .any(|(ty, _)| matches!(ty, RTM_NEWLINK | RTM_NEWADDR | RTM_DELADDR))
            {
                changed = true;
            }
        }
    }
}
