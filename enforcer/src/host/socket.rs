//! The two rtnetlink sockets: one subscribed to changes, one for dumps.

use std::time::Duration;

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::LinkMessage;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tracing::warn;

use super::Error;
use super::decode::{self, Event};
use super::facts::Facts;

/// Large enough for any datagram the kernel sends (dumps fill at most 32 KiB).
const BUF: usize = 1 << 16;
/// How often a quiet watcher looks at its stop flag.
const TICK: Duration = Duration::from_millis(200);
/// A dump the kernel doesn't finish in this time failed.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Dumps interrupted by changes are started again this many times before one is taken
/// as it is (and another is asked for).
const DUMP_TRIES: usize = 8;

const GROUPS: u32 = (libc::RTMGRP_LINK
    | libc::RTMGRP_IPV4_IFADDR
    | libc::RTMGRP_IPV6_IFADDR
    | libc::RTMGRP_IPV4_ROUTE
    | libc::RTMGRP_IPV6_ROUTE) as u32;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

pub struct Follower {
    events: Socket,
    dump: Socket,
    seq: u32,
    buf: Vec<u8>,
    pub facts: Facts,
    pub need_resync: bool,
}

impl Follower {
    pub fn open() -> Result<Follower, Error> {
        let mut events = Socket::new(NETLINK_ROUTE).map_err(io("opening a socket"))?;
        events
            .bind(&SocketAddr::new(0, GROUPS))
            .map_err(io("subscribing to link, address and route changes"))?;
        // A big buffer makes overruns (and the re-dumps they cost) rare; the kernel caps it
        // at net.core.rmem_max.
        let _ = events.set_rx_buf_sz(4usize << 20);
        socket2::SockRef::from(&events)
            .set_read_timeout(Some(TICK))
            .map_err(io("setting a read timeout"))?;
        let mut dump = Socket::new(NETLINK_ROUTE).map_err(io("opening a socket"))?;
        dump.bind_auto().map_err(io("binding the dump socket"))?;
        dump.connect(&SocketAddr::new(0, 0))
            .map_err(io("connecting the dump socket"))?;
        socket2::SockRef::from(&dump)
            .set_read_timeout(Some(DUMP_TIMEOUT))
            .map_err(io("setting a read timeout"))?;
        Ok(Follower {
            events,
            dump,
            seq: 0,
            buf: Vec::with_capacity(BUF),
            facts: Facts::default(),
            need_resync: true,
        })
    }

    /// Receives one datagram into `self.buf`; `None` if none is waiting (non-blocking) or
    /// none came within the tick.
    fn recv(sock: &Socket, buf: &mut Vec<u8>, flags: libc::c_int) -> std::io::Result<Option<()>> {
        buf.clear();
        match sock.recv(buf, flags | libc::MSG_TRUNC) {
            Ok(n) if n > buf.len() => Err(std::io::Error::other(format!(
                "a {n}-byte datagram did not fit the {BUF}-byte buffer"
            ))),
            Ok(_) => Ok(Some(())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn feed(&mut self) -> Result<usize, Error> {
        let msgs = decode::datagram(&self.buf)?;
        for m in &msgs {
            if let Some(ev) = &m.event {
                self.need_resync |= self.facts.apply(ev).resync;
            }
        }
        Ok(msgs.len())
    }

    /// Waits up to a tick for changes and reads every one waiting; the number of messages.
    /// An overrun (the kernel dropped changes) asks for a resync instead of failing.
    pub fn next_burst(&mut self) -> Result<usize, Error> {
        let mut n = 0;
        let mut flags = 0;
        loop {
            match Self::recv(&self.events, &mut self.buf, flags) {
                Ok(Some(())) => n += self.feed()?,
                Ok(None) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    warn!(
                        "the kernel dropped topology events (socket overrun); dumping everything again"
                    );
                    self.need_resync = true;
                }
                Err(e) => return Err(io("reading changes")(e)),
            }
            flags = libc::MSG_DONTWAIT;
        }
    }

    /// Dumps links, addresses and routes into fresh facts, then applies the changes that
    /// queued meanwhile.
    pub fn resync(&mut self) -> Result<(), Error> {
        let mut last = None;
        for _ in 0..DUMP_TRIES {
            let (facts, interrupted) = self.dump_all()?;
            last = Some(facts);
            if !interrupted {
                self.need_resync = false;
                break;
            }
        }
        // Interrupted every time: take the last one, and ask for another.
        self.facts = last.expect("at least one dump");
        while Self::recv(&self.events, &mut self.buf, libc::MSG_DONTWAIT)
            .map_err(io("reading changes"))?
            .is_some()
        {
            self.feed()?;
        }
        Ok(())
    }

    fn dump_all(&mut self) -> Result<(Facts, bool), Error> {
        let mut facts = Facts::default();
        let mut interrupted = false;
        let requests = [
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            Self::get_route(AddressFamily::Inet),
            Self::get_route(AddressFamily::Inet6),
        ];
        for req in requests {
            interrupted |= self.dump_one(req, &mut facts)?;
        }
        Ok((facts, interrupted))
    }

    fn get_route(family: AddressFamily) -> RouteNetlinkMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        RouteNetlinkMessage::GetRoute(m)
    }

    fn dump_one(&mut self, req: RouteNetlinkMessage, facts: &mut Facts) -> Result<bool, Error> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = NetlinkMessage::from(req);
        msg.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        msg.header.sequence_number = self.seq;
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        self.dump
            .send(&out, 0)
            .map_err(io("sending a dump request"))?;
        let mut interrupted = false;
        loop {
            if Self::recv(&self.dump, &mut self.buf, 0)
                .map_err(io("reading a dump"))?
                .is_none()
            {
                return Err(Error::Kernel("a dump did not finish in time".into()));
            }
            for m in decode::datagram(&self.buf)? {
                if m.seq != self.seq {
                    continue;
                }
                interrupted |= m.interrupted;
                match m.event {
                    Some(Event::Done) => return Ok(interrupted),
                    Some(Event::Error(0)) => {}
                    Some(Event::Error(code)) => {
                        return Err(Error::Kernel(format!(
                            "dump refused: {}",
                            std::io::Error::from_raw_os_error(-code)
                        )));
                    }
                    Some(ev) => {
                        facts.apply(&ev);
                    }
                    None => {}
                }
            }
        }
    }
}
