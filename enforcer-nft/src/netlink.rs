//! The fast path for deltas: the same batch `render::delta` produced, sent straight to the
//! kernel as one nfnetlink transaction when every command in it is one this module can
//! encode (plain chains, elements of hash sets and maps, flushing and deleting sets).
//!
//! Why: `nft` (1.0.6) reads every element of the table before it runs a batch containing
//! any deletion, so with tens of thousands of elements a one-pod delta cost 20 ms in `nft`
//! alone, most of it listing elements the delta never touches. The kernel needs none of
//! that. Anything else (new rulesets, interval sets, chain rewrites) still goes through
//! `nft`, so both paths apply exactly the same commands.

use std::io::Read;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use crate::render::TABLE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the kernel refused the batch: {0}")]
    Refused(std::io::Error),
    #[error("no answer from the kernel for {0} of the batch's messages")]
    Unanswered(usize),
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const NFPROTO_INET: u8 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
/// libnftnl's user-data TLV type for an element comment, as `nft` reads it back.
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

/// How a set's keys and data are laid out, by set name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// `addr4`/`addr6`: address → mark.
    AddrMark,
    /// `in_if`/`out_if`: interface index → verdict.
    IfVerdict,
    /// `src*`/`dst*`: interface index · address → verdict.
    IfAddrVerdict,
    /// `local4`/`local6`: address.
    Addr,
    /// `*_aa`: mark.
    Mark,
    /// `*_gx`: mark · inet_proto · inet_service.
    MarkProtoPort,
    /// `*_n4`/`*_n6`: address · inet_proto · inet_service.
    AddrProtoPort,
    /// `record`: mark · mark · mark, with the record as the element's comment.
    Record,
}

fn layout(set: &str) -> Option<Layout> {
    // The address maps carry their epoch (`addr4_0000002a`, see `render::in_epoch`).
    let map = match set.rsplit_once('_') {
        Some((m, e)) if e.len() == 8 && e.bytes().all(|b| b.is_ascii_hexdigit()) => m,
        _ => set,
    };
    if matches!(map, "addr4" | "addr6") {
        return Some(Layout::AddrMark);
    }
    Some(match set {
        crate::render::RECORD => Layout::Record,
        "in_if" | "out_if" => Layout::IfVerdict,
        "src4" | "src6" | "dst4" | "dst6" => Layout::IfAddrVerdict,
        "local4" | "local6" => Layout::Addr,
        // A ruleset's allow sets, and an ordered ruleset's deny sets (`_d…`) of the same type.
        s if s.ends_with("_aa") || s.ends_with("_daa") => Layout::Mark,
        s if s.ends_with("_gx") || s.ends_with("_dgx") => Layout::MarkProtoPort,
        s if ["_n4", "_n6", "_dn4", "_dn6"]
            .iter()
            .any(|x| s.ends_with(x)) =>
        {
            Layout::AddrProtoPort
        }
        // Interval sets (class maps, port ranges) need nft's interval encoding.
        _ => return None,
    })
}

/// A batch of nfnetlink messages under construction.
struct Batch {
    buf: Vec<u8>,
    seq: u32,
    acked: usize,
}

impl Batch {
    fn new(seq: u32) -> Self {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            seq,
            acked: 0,
        };
        let m = b.begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.end(m);
        b
    }

    /// Starts a message; returns its offset.
    fn begin(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.buf.len();
        self.seq += 1;
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&[family, 0]);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn nft_msg(&mut self, cmd: u16, flags: u16) -> usize {
        self.acked += 1;
        self.begin(
            (NFNL_SUBSYS_NFTABLES << 8) | cmd,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            NFPROTO_INET,
            0,
        )
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn str_attr(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn unnest(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> (Vec<u8>, usize, u32) {
        let m = self.begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end(m);
        (self.buf, self.acked, self.seq)
    }
}

/// Encodes `commands` (as `render` produces them) as one batch, or `None` when one of them
/// needs `nft`.
fn encode(commands: &[Value], seq: u32) -> Option<(Vec<u8>, usize, u32)> {
    let mut b = Batch::new(seq);
    for c in commands {
        let (verb, body) = c.as_object()?.iter().next()?;
        let (kind, o) = body.as_object()?.iter().next()?;
        if o["family"] != "inet" || o["table"] != TABLE {
            return None;
        }
        match (verb.as_str(), kind.as_str()) {
            ("add" | "delete", "chain") => {
                // Only plain chains: base chains carry a hook, which this path doesn't encode.
                if o.as_object()?
                    .keys()
                    .any(|k| !matches!(k.as_str(), "family" | "table" | "name"))
                {
                    return None;
                }
                let (cmd, flags) = if verb == "add" {
                    (NFT_MSG_NEWCHAIN, NLM_F_CREATE)
                } else {
                    (NFT_MSG_DELCHAIN, 0)
                };
                let m = b.nft_msg(cmd, flags);
                b.str_attr(NFTA_CHAIN_TABLE, TABLE);
                b.str_attr(NFTA_CHAIN_NAME, o["name"].as_str()?);
                b.end(m);
            }
            ("delete", "set" | "map") => {
                let m = b.nft_msg(NFT_MSG_DELSET, 0);
                b.str_attr(NFTA_SET_TABLE, TABLE);
                b.str_attr(NFTA_SET_NAME, o["name"].as_str()?);
                b.end(m);
            }
            ("flush", "set" | "map") => {
                // An element message without elements: the kernel deletes them all.
                let m = b.nft_msg(NFT_MSG_DELSETELEM, 0);
                b.str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE);
                b.str_attr(NFTA_SET_ELEM_LIST_SET, o["name"].as_str()?);
                b.end(m);
            }
            ("add" | "delete", "element") => {
                let set = o["name"].as_str()?;
                let layout = layout(set)?;
                let (cmd, flags) = if verb == "add" {
                    (NFT_MSG_NEWSETELEM, NLM_F_CREATE)
                } else {
                    (NFT_MSG_DELSETELEM, 0)
                };
                let m = b.nft_msg(cmd, flags);
                b.str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE);
                b.str_attr(NFTA_SET_ELEM_LIST_SET, set);
                let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
                for e in o["elem"].as_array()? {
                    element(&mut b, layout, e, verb == "add")?;
                }
                b.unnest(list);
                b.end(m);
            }
            _ => return None,
        }
    }
    Some(b.finish())
}

fn addr(v: &Value) -> Option<Vec<u8>> {
    Some(match v.as_str()?.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    })
}

fn mark(v: &Value) -> Option<[u8; 4]> {
    Some(u32::try_from(v.as_u64()?).ok()?.to_ne_bytes())
}

/// `meta iif`/`oif` load the index as a host-order 32-bit word, like a mark.
fn iface(v: &Value) -> Option<[u8; 4]> {
    mark(v)
}

/// A verdict as the kernel takes it: its code and, for `jump`/`goto`, the chain.
fn verdict(v: &Value) -> Option<(i32, Option<&str>)> {
    let (kind, body) = v.as_object()?.iter().next()?;
    Some(match kind.as_str() {
        "accept" => (NF_ACCEPT, None),
        "drop" => (NF_DROP, None),
        "return" => (NFT_RETURN, None),
        "jump" => (NFT_JUMP, Some(body["target"].as_str()?)),
        "goto" => (NFT_GOTO, Some(body["target"].as_str()?)),
        _ => return None,
    })
}

/// A concatenation's fields each take whole 32-bit registers.
fn concat(fields: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in fields {
        out.extend_from_slice(f);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    out
}

fn proto_port(p: &Value, port: &Value) -> Option<[Vec<u8>; 2]> {
    let p = u8::try_from(p.as_u64()?).ok()?;
    let port = u16::try_from(port.as_u64()?).ok()?;
    Some([vec![p], port.to_be_bytes().to_vec()])
}

fn element(b: &mut Batch, layout: Layout, e: &Value, with_data: bool) -> Option<()> {
    let mut comment: Option<&str> = None;
    let (key, data): (Vec<u8>, Option<&Value>) = match layout {
        Layout::Record => {
            // Added with a comment ({"elem": {"val", "comment"}}), deleted by key alone.
            let (val, c) = match e.get("elem") {
                Some(inner) => (&inner["val"], Some(inner["comment"].as_str()?)),
                None => (e, None),
            };
            comment = c;
            let f = val["concat"].as_array()?;
            let marks: Option<Vec<Vec<u8>>> =
                f.iter().map(|x| mark(x).map(|m| m.to_vec())).collect();
            let marks = marks?;
            if marks.len() != 3 {
                return None;
            }
            (concat(&marks), None)
        }
        Layout::AddrMark => {
            let pair = e.as_array()?;
            (addr(pair.first()?)?, Some(pair.get(1)?))
        }
        Layout::IfVerdict => {
            let pair = e.as_array()?;
            (iface(pair.first()?)?.to_vec(), Some(pair.get(1)?))
        }
        Layout::IfAddrVerdict => {
            let pair = e.as_array()?;
            let f = pair.first()?["concat"].as_array()?;
            if f.len() != 2 {
                return None;
            }
            (
                concat(&[iface(f.first()?)?.to_vec(), addr(f.get(1)?)?]),
                Some(pair.get(1)?),
            )
        }
        Layout::Addr => (addr(e)?, None),
        Layout::Mark => (mark(e)?.to_vec(), None),
        Layout::MarkProtoPort | Layout::AddrProtoPort => {
            let f = e["concat"].as_array()?;
            let first = if layout == Layout::MarkProtoPort {
                mark(f.first()?)?.to_vec()
            } else {
                addr(f.first()?)?
            };
            let [p, port] = proto_port(f.get(1)?, f.get(2)?)?;
            (concat(&[first, p, port]), None)
        }
    };
    let el = b.nest(NFTA_LIST_ELEM);
    let k = b.nest(NFTA_SET_ELEM_KEY);
    b.attr(NFTA_DATA_VALUE, &key);
    b.unnest(k);
    if let (true, Some(d)) = (with_data, data) {
        let dn = b.nest(NFTA_SET_ELEM_DATA);
        match layout {
            Layout::AddrMark => b.attr(NFTA_DATA_VALUE, &mark(d)?),
            _ => {
                let (code, target) = verdict(d)?;
                let v = b.nest(NFTA_DATA_VERDICT);
                b.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
                if let Some(t) = target {
                    b.str_attr(NFTA_VERDICT_CHAIN, t);
                }
                b.unnest(v);
            }
        }
        b.unnest(dn);
    }
    if let (true, Some(c)) = (with_data, comment) {
        let mut tlv = vec![
            NFTNL_UDATA_SET_ELEM_COMMENT,
            u8::try_from(c.len() + 1).ok()?,
        ];
        tlv.extend_from_slice(c.as_bytes());
        tlv.push(0);
        b.attr(NFTA_SET_ELEM_USERDATA, &tlv);
    }
    b.unnest(el);
    Some(())
}

/// Can `commands` go through netlink?
pub fn supports(commands: &[Value]) -> bool {
    encode(commands, 0).is_some()
}

/// A netfilter netlink socket, kept open: closing one costs the kernel milliseconds (more
/// than a whole small transaction), so a delta must not pay for it.
pub struct Conn {
    sock: Socket,
    seq: u32,
}

impl Conn {
    pub fn open() -> Result<Conn, Error> {
        // Unbound and unconnected: the kernel (port 0) is the destination.
        let sock = Socket::new(
            Domain::from(AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(NETLINK_NETFILTER)),
        )?;
        Ok(Conn { sock, seq: 0 })
    }

    /// Sends `commands` as one transaction; `Ok(false)` when they need `nft` instead
    /// (nothing was sent). The kernel commits all of it or, on any error, none of it.
    pub fn apply(&mut self, commands: &[Value]) -> Result<bool, Error> {
        let first = self.seq.wrapping_add(1);
        let Some((batch, expected, last)) = encode(commands, self.seq) else {
            return Ok(false);
        };
        self.seq = last;
        self.sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        self.sock.send(&batch)?;
        let mut seen = 0;
        let mut failure: Option<std::io::Error> = None;
        let mut buf = vec![0u8; 64 * 1024];
        while seen < expected {
            let n = match self.sock.read(&mut buf) {
                Ok(n) => n,
                Err(e) if failure.is_some() && is_timeout(&e) => break,
                Err(e) if is_timeout(&e) => return Err(Error::Unanswered(expected - seen)),
                Err(e) => return Err(e.into()),
            };
            let mut at = 0;
            while at + 16 <= n {
                let word =
                    |i: usize| u32::from_ne_bytes(buf[i..i + 4].try_into().expect("4 bytes"));
                let len = word(at) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
                let seq = word(at + 8);
                if len < 16 || at + len > n {
                    break;
                }
                // Answers to an earlier, aborted batch may still be queued: skip them.
                let ours = seq.wrapping_sub(first) <= last.wrapping_sub(first);
                if ty == NLMSG_ERROR && len >= 20 && ours {
                    let code = word(at + 16) as i32;
                    seen += 1;
                    if code != 0 && failure.is_none() {
                        failure = Some(std::io::Error::from_raw_os_error(-code));
                        // An aborted batch answers only the failed messages: don't wait long.
                        self.sock
                            .set_read_timeout(Some(Duration::from_millis(50)))?;
                    }
                }
                at += (len + 3) & !3;
            }
        }
        match failure {
            Some(e) => Err(Error::Refused(e)),
            None => Ok(true),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

const AF_NETLINK: i32 = 16;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn el(set: &str, verb: &str, elem: Value) -> Value {
        json!({verb: {"element": {"family": "inet", "table": TABLE, "name": set, "elem": [elem]}}})
    }

    #[test]
    fn hash_set_changes_are_encoded_and_everything_else_is_left_to_nft() {
        let ok = vec![
            el("record", "delete", json!({"concat": [1, 2, 3]})),
            json!({"delete": {"chain": {"family": "inet", "table": TABLE, "name": "i_old"}}}),
            el("addr4", "add", json!(["10.0.0.1", 7])),
            el("addr6", "delete", json!(["fd00::1", 7])),
            el("in_if", "add", json!([7, {"goto": {"target": "pod_src"}}])),
            el("out_if", "delete", json!([2, {"accept": null}])),
            el("addr4_0000002a", "add", json!(["10.0.0.2", 7])),
            json!({"flush": {"map": {"family": "inet", "table": TABLE, "name": "src4"}}}),
            json!({"flush": {"set": {"family": "inet", "table": TABLE, "name": "record"}}}),
            json!({"delete": {"map": {"family": "inet", "table": TABLE, "name": "class4_00000029", "type": "ipv4_addr", "map": "mark"}}}),
            json!({"delete": {"set": {"family": "inet", "table": TABLE, "name": "i_old_00000029_gp", "type": ["mark", "inet_proto", "inet_service"]}}}),
            el(
                "src4",
                "add",
                json!([{"concat": [7, "10.0.0.1"]}, {"goto": {"target": "e_abc"}}]),
            ),
            el(
                "dst6",
                "add",
                json!([{"concat": [7, "fd00::1"]}, {"accept": null}]),
            ),
            el(
                "src6",
                "add",
                json!([{"concat": [7, "fd00::1"]}, {"return": null}]),
            ),
            el("local4", "add", json!("10.0.0.1")),
            el("i_abc_aa", "add", json!(7)),
            el("i_abc_gx", "add", json!({"concat": [7, 6, 80]})),
            el("e_abc_n6", "delete", json!({"concat": ["fd00::2", 17, 53]})),
            el(
                "record",
                "add",
                json!({"elem": {"val": {"concat": [2, 2, 3]}, "comment": "v_2_ab_00000003"}}),
            ),
        ];
        assert!(supports(&ok));
        for bad in [
            el(
                "class4",
                "add",
                json!([{"range": ["10.0.0.0", "10.0.0.255"]}, 3]),
            ),
            el(
                "class4_0000002a",
                "add",
                json!([{"range": ["10.0.0.0", "10.0.0.255"]}, 3]),
            ),
            el(
                "i_abc_gp",
                "add",
                json!({"concat": [7, 6, {"range": [80, 90]}]}),
            ),
            json!({"add": {"set": {"family": "inet", "table": TABLE, "name": "i_new_aa", "type": "mark"}}}),
            json!({"flush": {"chain": {"family": "inet", "table": TABLE, "name": "i_abc"}}}),
            json!({"add": {"chain": {"family": "inet", "table": TABLE, "name": "forward", "hook": "forward"}}}),
            el("addr4", "add", json!(["not an address", 7])),
            el(
                "src4",
                "add",
                json!([{"concat": [7, "10.0.0.1"]}, {"queue": null}]),
            ),
            el("in_if", "add", json!(["eth0", {"accept": null}])),
        ] {
            let mut v = ok.clone();
            v.push(bad.clone());
            assert!(!supports(&v), "{bad}");
        }
    }

    #[test]
    fn keys_use_the_kernel_register_layout() {
        let (b, n, _) = encode(&[el("i_x_gx", "add", json!({"concat": [258, 6, 80]}))], 0).unwrap();
        assert_eq!(n, 1);
        let key = concat(&[
            258u32.to_ne_bytes().to_vec(),
            vec![6],
            80u16.to_be_bytes().to_vec(),
        ]);
        assert_eq!(key.len(), 12);
        assert_eq!(&key[4..8], &[6, 0, 0, 0]);
        assert_eq!(&key[8..12], &[0, 80, 0, 0]);
        assert!(b.windows(12).any(|w| w == key.as_slice()));
        // Batch begin, one message, batch end; lengths add up.
        let mut at = 0;
        let mut msgs = 0;
        while at < b.len() {
            at += u32::from_ne_bytes(b[at..at + 4].try_into().unwrap()) as usize;
            msgs += 1;
        }
        assert_eq!((at, msgs), (b.len(), 3));
    }
}
