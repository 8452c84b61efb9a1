//! The little of DNS (RFC 1035) the egress resolver needs: a query's first question, a
//! REFUSED answer to it, and the addresses (A and AAAA records, with their TTLs) an upstream
//! answer carries. Messages are forwarded as they are; nothing here builds records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A query's first question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lower case, without the trailing dot.
    pub name: String,
    pub record_type: u16,
}

pub const TYPE_A: u16 = 1;
pub const TYPE_AAAA: u16 = 28;
const HEADER_LEN: usize = 12;
/// RCODE 5.
const REFUSED: u8 = 5;

/// Reads a name at `at` (following compression pointers, at most 16 of them), returning it and
/// the offset just after its encoding at `at`.
fn read_name(message: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = usize::from(*message.get(at)?);
        if len & 0xc0 == 0xc0 {
            let pointer = ((len & 0x3f) << 8) | usize::from(*message.get(at + 1)?);
            end.get_or_insert(at + 2);
            jumps += 1;
            if jumps > 16 || pointer >= message.len() {
                return None;
            }
            at = pointer;
            continue;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        if len == 0 {
            let end = end.unwrap_or(at + 1);
            let name = labels.join(".").to_ascii_lowercase();
            return (name.len() <= 253).then_some((name, end));
        }
        let label = message.get(at + 1..at + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).into_owned());
        at += 1 + len;
    }
}

/// The first question of a query (`None` for an answer, or anything malformed).
pub fn question(message: &[u8]) -> Option<Question> {
    if message.len() < HEADER_LEN {
        return None;
    }
    let is_response = message[2] & 0x80 != 0;
    let questions = u16::from_be_bytes([message[4], message[5]]);
    if is_response || questions == 0 {
        return None;
    }
    let (name, after) = read_name(message, HEADER_LEN)?;
    let record_type = u16::from_be_bytes([*message.get(after)?, *message.get(after + 1)?]);
    message.get(after + 3)?;
    Some(Question { name, record_type })
}

/// The answer REFUSED to `query` (its id and question kept, nothing else).
pub fn refused(query: &[u8]) -> Option<Vec<u8>> {
    let (_, after) = read_name(query, HEADER_LEN)?;
    let question_end = after + 4;
    let mut answer = query.get(..question_end)?.to_vec();
    // QR set, opcode and RD kept; RA set; RCODE REFUSED.
    answer[2] = 0x80 | (query[2] & 0x79);
    answer[3] = 0x80 | REFUSED;
    // One question, no records.
    answer[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    Some(answer)
}

/// The addresses an answer gives, with their TTLs (seconds).
pub fn addresses(message: &[u8]) -> Vec<(IpAddr, u32)> {
    let mut found = Vec::new();
    if message.len() < HEADER_LEN || message[2] & 0x80 == 0 {
        return found;
    }
    let count = |at: usize| usize::from(u16::from_be_bytes([message[at], message[at + 1]]));
    let (questions, answers) = (count(4), count(6));
    let mut at = HEADER_LEN;
    for _ in 0..questions {
        let Some((_, after)) = read_name(message, at) else {
            return found;
        };
        at = after + 4;
    }
    for _ in 0..answers {
        let Some((_, after)) = read_name(message, at) else {
            return found;
        };
        let Some(fixed) = message.get(after..after + 10) else {
            return found;
        };
        let record_type = u16::from_be_bytes([fixed[0], fixed[1]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let Some(data) = message.get(after + 10..after + 10 + len) else {
            return found;
        };
        match (record_type, len) {
            (TYPE_A, 4) => found.push((
                IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3])),
                ttl,
            )),
            (TYPE_AAAA, 16) => {
                let octets: [u8; 16] = data.try_into().expect("16 bytes");
                found.push((IpAddr::V6(Ipv6Addr::from(octets)), ttl));
            }
            _ => {}
        }
        at = after + 10 + len;
    }
    found
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` of `record_type`, as a stub resolver sends it.
    pub(crate) fn query(id: u16, name: &str, record_type: u16) -> Vec<u8> {
        let mut message = id.to_be_bytes().to_vec();
        message.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            message.push(label.len() as u8);
            message.extend(label.as_bytes());
        }
        message.push(0);
        message.extend(record_type.to_be_bytes());
        message.extend(1u16.to_be_bytes());
        message
    }

    /// An answer to `query` with A records (compressed names pointing at the question).
    pub(crate) fn answer(query: &[u8], addresses: &[(Ipv4Addr, u32)]) -> Vec<u8> {
        let mut message = query.to_vec();
        message[2] = 0x81;
        message[3] = 0x80;
        message[6..8].copy_from_slice(&(addresses.len() as u16).to_be_bytes());
        for (address, ttl) in addresses {
            message.extend([0xc0, 12]);
            message.extend(TYPE_A.to_be_bytes());
            message.extend(1u16.to_be_bytes());
            message.extend(ttl.to_be_bytes());
            message.extend(4u16.to_be_bytes());
            message.extend(address.octets());
        }
        message
    }

    #[test]
    fn a_query_is_read_and_refused_and_an_answer_gives_its_addresses() {
        let asked = query(0x1234, "API.example.com", TYPE_A);
        assert_eq!(
            question(&asked),
            Some(Question {
                name: "api.example.com".into(),
                record_type: TYPE_A
            })
        );
        let no = refused(&asked).unwrap();
        assert_eq!(&no[..2], &[0x12, 0x34]);
        assert_eq!(no[3] & 0x0f, 5);
        assert_eq!(no[2] & 0x80, 0x80);
        assert_eq!(question(&no), None, "an answer is not a query");
        assert!(addresses(&no).is_empty());
        let yes = answer(
            &asked,
            &[
                (Ipv4Addr::new(10, 1, 2, 3), 300),
                (Ipv4Addr::new(10, 1, 2, 4), 5),
            ],
        );
        assert_eq!(
            addresses(&yes),
            vec![
                (IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)), 300),
                (IpAddr::V4(Ipv4Addr::new(10, 1, 2, 4)), 5)
            ]
        );
    }

    #[test]
    fn malformed_messages_give_nothing() {
        assert_eq!(question(&[0; 5]), None);
        let mut looped = query(1, "a.b", TYPE_A);
        // A name that points at itself.
        looped.truncate(12);
        looped.extend([0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(question(&looped), None);
        let asked = query(1, "a.b", TYPE_A);
        let mut cut = answer(&asked, &[(Ipv4Addr::new(1, 2, 3, 4), 1)]);
        cut.truncate(cut.len() - 2);
        assert!(addresses(&cut).is_empty());
    }
}
