//! The name a guest's connection asks for, read from its first bytes without consuming them:
//! the server name (SNI) of a TLS ClientHello, or the `Host` of an HTTP/1 request. The egress
//! proxy matches domain rules against it (E2B: port 443 by SNI, port 80 by `Host`).
//!
//! Both readers take what has arrived so far and say whether they need more; they never
//! allocate more than the name, and refuse what is malformed instead of guessing.

/// What the first bytes of a connection say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// The name asked for (lower case, without a port or a trailing dot).
    Name(String),
    /// The protocol was recognised but names nothing (a ClientHello without SNI, as for an IP
    /// literal; an HTTP request without `Host`).
    Nameless,
    /// Not enough bytes yet.
    NeedMore,
    /// Not this protocol, or malformed.
    Unrecognised,
}

/// The most bytes read before giving up on a name: a ClientHello or a request head longer than
/// this is treated as unrecognised.
pub const MOST_BYTES: usize = 16 * 1024;

/// Reads the SNI of a TLS ClientHello (record layer included).
pub fn tls_server_name(bytes: &[u8]) -> Sniffed {
    // Record header: type 22 (handshake), version 3.x, length.
    if bytes.is_empty() {
        return Sniffed::NeedMore;
    }
    if bytes[0] != 22 {
        return Sniffed::Unrecognised;
    }
    if bytes.len() < 5 {
        return Sniffed::NeedMore;
    }
    if bytes[1] != 3 {
        return Sniffed::Unrecognised;
    }
    let record_len = usize::from(u16::from_be_bytes([bytes[3], bytes[4]]));
    // Handshake header: type 1 (ClientHello), 24-bit length. The hello may span records; we
    // read it from the first record only, which in practice holds it (and refuse otherwise).
    let available = &bytes[5..];
    if available.len() < 4 {
        return Sniffed::NeedMore;
    }
    if available[0] != 1 {
        return Sniffed::Unrecognised;
    }
    let hello_len = (usize::from(available[1]) << 16)
        | (usize::from(available[2]) << 8)
        | usize::from(available[3]);
    if hello_len + 4 > record_len {
        return if bytes.len() >= MOST_BYTES {
            Sniffed::Unrecognised
        } else {
            // A hello split over records: read the rest of this one at least.
            if available.len() < record_len {
                Sniffed::NeedMore
            } else {
                Sniffed::Unrecognised
            }
        };
    }
    if available.len() < 4 + hello_len {
        return Sniffed::NeedMore;
    }
    parse_hello(&available[4..4 + hello_len]).unwrap_or(Sniffed::Unrecognised)
}

/// A cursor over a ClientHello's body.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

fn parse_hello(body: &[u8]) -> Option<Sniffed> {
    let mut hello = Reader { bytes: body };
    hello.take(2 + 32)?; // version, random
    let session = hello.u8()?;
    hello.take(session)?;
    let suites = hello.u16()?;
    hello.take(suites)?;
    let compression = hello.u8()?;
    hello.take(compression)?;
    if hello.bytes.is_empty() {
        return Some(Sniffed::Nameless);
    }
    let extensions_len = hello.u16()?;
    let mut extensions = Reader {
        bytes: hello.take(extensions_len)?,
    };
    while !extensions.bytes.is_empty() {
        let kind = extensions.u16()?;
        let len = extensions.u16()?;
        let data = extensions.take(len)?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (type, name); type 0 is a host name.
        let mut list = Reader { bytes: data };
        let list_len = list.u16()?;
        let mut names = Reader {
            bytes: list.take(list_len)?,
        };
        while !names.bytes.is_empty() {
            let name_type = names.u8()?;
            let name_len = names.u16()?;
            let name = names.take(name_len)?;
            if name_type == 0 {
                return host_name(name).map(Sniffed::Name);
            }
        }
        return Some(Sniffed::Nameless);
    }
    Some(Sniffed::Nameless)
}

/// A host name as sent: ASCII letters, digits, `-`, `_`, `.`; lower-cased, trailing dot gone.
pub(crate) fn host_name(bytes: &[u8]) -> Option<String> {
    let valid = !bytes.is_empty()
        && bytes.len() <= 253
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid.then(|| {
        String::from_utf8_lossy(bytes)
            .trim_end_matches('.')
            .to_ascii_lowercase()
    })
}

/// Reads the `Host` of an HTTP/1 request head (without its port).
pub fn http_host(bytes: &[u8]) -> Sniffed {
    // A request line starts with a method: uppercase letters then a space.
    let method_len = bytes.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == bytes.len() {
        return if method_len <= 16 {
            Sniffed::NeedMore
        } else {
            Sniffed::Unrecognised
        };
    }
    if method_len == 0 || bytes[method_len] != b' ' {
        return Sniffed::Unrecognised;
    }
    let Some(end) = find(bytes, b"\r\n\r\n") else {
        return if bytes.len() >= MOST_BYTES {
            Sniffed::Unrecognised
        } else {
            Sniffed::NeedMore
        };
    };
    let head = &bytes[..end];
    let mut lines = head.split(|b| *b == b'\n');
    let request_line = lines.next().unwrap_or_default();
    if !request_line.trim_ascii_end().ends_with(b" HTTP/1.1")
        && !request_line.trim_ascii_end().ends_with(b" HTTP/1.0")
    {
        return Sniffed::Unrecognised;
    }
    for line in lines {
        let line = line.trim_ascii_end();
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            continue;
        }
        let value = line[colon + 1..].trim_ascii();
        // Without its port (an IPv6 literal's brackets hold colons).
        let host = if value.first() == Some(&b'[') {
            match value.iter().position(|b| *b == b']') {
                Some(close) => &value[1..close],
                None => return Sniffed::Unrecognised,
            }
        } else {
            match value.iter().rposition(|b| *b == b':') {
                Some(colon) => &value[..colon],
                None => value,
            }
        };
        return match host_name(host) {
            Some(name) => Sniffed::Name(name),
            None if host.contains(&b':') => Sniffed::Nameless,
            None => Sniffed::Unrecognised,
        };
    }
    Sniffed::Nameless
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a TLS client writes it, with `server_name` when given.
    pub(crate) fn client_hello(server_name: Option<&str>) -> Vec<u8> {
        let mut extensions = Vec::new();
        if let Some(name) = server_name {
            let name = name.as_bytes();
            let mut list = vec![0u8];
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            extensions.extend(0u16.to_be_bytes());
            extensions.extend((data.len() as u16).to_be_bytes());
            extensions.extend(data);
        }
        // Another extension (supported_versions) before or after does not matter.
        extensions.extend(43u16.to_be_bytes());
        extensions.extend(3u16.to_be_bytes());
        extensions.extend([2, 3, 4]);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]); // compression
        body.extend((extensions.len() as u16).to_be_bytes());
        body.extend(extensions);
        let mut handshake = vec![1];
        handshake.extend(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![22, 3, 1];
        record.extend((handshake.len() as u16).to_be_bytes());
        record.extend(handshake);
        record
    }

    #[test]
    fn the_server_name_is_read_from_a_client_hello_arriving_in_pieces() {
        let hello = client_hello(Some("Api.Example.com."));
        for cut in [0, 1, 4, 5, 8, 40, hello.len() - 1] {
            assert_eq!(tls_server_name(&hello[..cut]), Sniffed::NeedMore, "{cut}");
        }
        assert_eq!(
            tls_server_name(&hello),
            Sniffed::Name("api.example.com".into())
        );
        assert_eq!(tls_server_name(&client_hello(None)), Sniffed::Nameless);
        assert_eq!(
            tls_server_name(b"GET / HTTP/1.1\r\n"),
            Sniffed::Unrecognised
        );
        let mut broken = hello.clone();
        broken[5] = 2; // a ServerHello
        assert_eq!(tls_server_name(&broken), Sniffed::Unrecognised);
        // A name with bytes no host name has is refused, not passed on.
        assert_eq!(
            tls_server_name(&client_hello(Some("a b.com"))),
            Sniffed::Unrecognised
        );
        // A hello whose lengths lie is unrecognised.
        let mut lying = hello;
        let at = lying.len() - 8;
        lying[at] = 0xff;
        assert_ne!(
            tls_server_name(&lying),
            Sniffed::Name("api.example.com".into())
        );
    }

    #[test]
    fn the_host_is_read_from_an_http_request_head() {
        let request = b"GET /x HTTP/1.1\r\nUser-Agent: curl\r\nHOST: Example.COM:8080\r\n\r\n";
        assert_eq!(http_host(request), Sniffed::Name("example.com".into()));
        assert_eq!(http_host(&request[..20]), Sniffed::NeedMore);
        assert_eq!(http_host(b"GE"), Sniffed::NeedMore);
        assert_eq!(
            http_host(b"POST / HTTP/1.1\r\nHost: a.test\r\n\r\nbody"),
            Sniffed::Name("a.test".into())
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::Nameless
        );
        assert_eq!(
            http_host(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"),
            Sniffed::Nameless
        );
        assert_eq!(http_host(&[22, 3, 1, 0, 5]), Sniffed::Unrecognised);
        assert_eq!(http_host(b"get / HTTP/1.1\r\n\r\n"), Sniffed::Unrecognised);
        assert_eq!(
            http_host(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
            Sniffed::Unrecognised
        );
    }
}
