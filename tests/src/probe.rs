//! Real traffic between lab namespaces: echo servers and the clients that
//! probe them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{LabError, Netns};

/// How long a denied probe waits before calling the path blocked. Shorter
/// than TCP's initial 1 s retransmission timeout, so a blocked connect sends
/// exactly one SYN and tests can count drops exactly.
pub const BLOCKED_AFTER: Duration = Duration::from_millis(700);

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Data went both ways.
    Connected,
    /// Nothing came back in time: the traffic was dropped.
    TimedOut,
    /// Something else happened (refused, reset, wrong echo): never expected.
    Failed(String),
}

/// An echo server for TCP (line based) and UDP on one address, inside a namespace.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Serves TCP and UDP echo on every port in `ports` at each of `addrs` in `ns`.
    pub fn start(ns: &Netns, addrs: &[IpAddr], tcp_ports: &[u16], udp_ports: &[u16]) -> Result<Self, LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            for &port in tcp_ports {
                let listener = ns.enter(|| TcpListener::bind(SocketAddr::new(addr, port)))??;
                listener.set_nonblocking(true)?;
                let stop = Arc::clone(&stop);
                threads.push(std::thread::spawn(move || serve_tcp(&listener, &stop)));
            }
            for &port in udp_ports {
                let socket = ns.enter(|| UdpSocket::bind(SocketAddr::new(addr, port)))??;
                socket.set_read_timeout(Some(Duration::from_millis(100)))?;
                let stop = Arc::clone(&stop);
                threads.push(std::thread::spawn(move || serve_udp(&socket, &stop)));
            }
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        if (&stream).write_all(format!("echo {line}").as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buffer = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((len, peer)) = socket.recv_from(&mut buffer) {
            let mut reply = b"echo ".to_vec();
            reply.extend_from_slice(&buffer[..len]);
            let _ = socket.send_to(&reply, peer);
        }
    }
}

/// Connects from `ns` to `to`, sends two lines and checks both echoes.
pub fn tcp(ns: &Netns, to: SocketAddr) -> Result<Outcome, LabError> {
    let mut session = match TcpSession::connect(ns, to)? {
        Ok(session) => session,
        Err(outcome) => return Ok(outcome),
    };
    for round in 0..2 {
        let outcome = session.exchange(&format!("bulkhead probe {round}"), Duration::from_secs(3));
        if outcome != Outcome::Connected {
            return Ok(outcome);
        }
    }
    Ok(Outcome::Connected)
}

/// A TCP connection opened from inside a namespace, kept open so tests can
/// watch what happens to a live flow.
pub struct TcpSession {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl TcpSession {
    /// Connects; `Err(outcome)` if the connection could not be made.
    pub fn connect(ns: &Netns, to: SocketAddr) -> Result<Result<Self, Outcome>, LabError> {
        ns.enter(|| {
            let stream = match TcpStream::connect_timeout(&to, BLOCKED_AFTER) {
                Ok(stream) => stream,
                Err(error) if error.kind() == std::io::ErrorKind::TimedOut => return Err(Outcome::TimedOut),
                Err(error) => return Err(Outcome::Failed(format!("connect: {error}"))),
            };
            let reader = stream.try_clone().map_err(|e| Outcome::Failed(format!("clone: {e}")))?;
            Ok(Self { stream, reader: BufReader::new(reader) })
        })
    }

    /// Sends `line` and waits up to `timeout` for its echo.
    pub fn exchange(&mut self, line: &str, timeout: Duration) -> Outcome {
        let _ = self.reader.get_ref().set_read_timeout(Some(timeout));
        let message = format!("{line}\n");
        if let Err(error) = self.stream.write_all(message.as_bytes()) {
            return Outcome::Failed(format!("write: {error}"));
        }
        let mut reply = String::new();
        match self.reader.read_line(&mut reply) {
            Ok(_) if reply == format!("echo {message}") => Outcome::Connected,
            Ok(0) => Outcome::Failed("connection closed".to_owned()),
            Ok(_) => Outcome::Failed(format!("unexpected echo of {} bytes", reply.len())),
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Outcome::TimedOut
            }
            Err(error) => Outcome::Failed(format!("read: {error}")),
        }
    }
}

/// Sends one datagram from `ns` to `to` and waits for its echo.
pub fn udp(ns: &Netns, to: SocketAddr) -> Result<Outcome, LabError> {
    udp_sized(ns, to, b"bulkhead probe".len())
}

/// Sends one datagram of `size` payload bytes (large ones leave as IP
/// fragments) and waits for its echo, checking every byte.
pub fn udp_sized(ns: &Netns, to: SocketAddr, size: usize) -> Result<Outcome, LabError> {
    ns.enter(|| {
        let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let socket = match UdpSocket::bind(any) {
            Ok(socket) => socket,
            Err(error) => return Outcome::Failed(format!("bind: {error}")),
        };
        let _ = socket.set_read_timeout(Some(BLOCKED_AFTER));
        let payload: Vec<u8> = b"bulkhead probe".iter().copied().cycle().take(size).collect();
        if let Err(error) = socket.send_to(&payload, to) {
            return Outcome::Failed(format!("send: {error}"));
        }
        let mut expected = b"echo ".to_vec();
        expected.extend_from_slice(&payload);
        let mut buffer = vec![0u8; 65536];
        match socket.recv_from(&mut buffer) {
            Ok((len, _)) if buffer[..len] == expected[..] => Outcome::Connected,
            Ok((len, _)) => Outcome::Failed(format!("unexpected echo of {len} bytes")),
            Err(error) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                Outcome::TimedOut
            }
            Err(error) => Outcome::Failed(format!("recv: {error}")),
        }
    })
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one ICMP echo request from `ns` to `to` over a raw socket and
/// waits for the matching reply (IPv4).
pub fn ping(ns: &Netns, to: Ipv4Addr) -> Result<Outcome, LabError> {
    ns.enter(|| {
        // SAFETY: plain socket syscalls on a descriptor this closure owns.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            if fd < 0 {
                return Outcome::Failed(format!("raw socket: {}", std::io::Error::last_os_error()));
            }
            let identifier = (std::process::id() as u16) ^ 0x5a5a;
            let mut request = [8u8, 0, 0, 0, 0, 0, 0, 1, b'b', b'h', b'!', b'!'];
            request[4..6].copy_from_slice(&identifier.to_be_bytes());
            let sum = checksum(&request);
            request[2..4].copy_from_slice(&sum.to_be_bytes());
            let address = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from(to).to_be() },
                sin_zero: [0; 8],
            };
            let sent = libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&address).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            );
            if sent < 0 {
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                return Outcome::Failed(format!("sendto: {error}"));
            }
            let deadline = Instant::now() + BLOCKED_AFTER;
            let mut buffer = [0u8; 512];
            let outcome = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Outcome::TimedOut;
                }
                let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
                if libc::poll(&raw mut poll, 1, left.as_millis() as i32) <= 0 {
                    continue;
                }
                let len = libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), 0);
                let Ok(len) = usize::try_from(len) else {
                    continue;
                };
                // A raw ICMP socket sees the IP header too.
                let header_len = usize::from(buffer[0] & 0x0f) * 4;
                let icmp = &buffer[header_len.min(len)..len];
                let source = Ipv4Addr::new(buffer[12], buffer[13], buffer[14], buffer[15]);
                if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == identifier.to_be_bytes() && source == to {
                    break Outcome::Connected;
                }
            };
            libc::close(fd);
            outcome
        }
    })
}

/// A plain HTTP GET from inside `ns`; returns (status, body). HTTP/1.0,
/// so no server answers in chunks (Prometheus would, to HTTP/1.1).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String), LabError> {
    ns.enter(|| -> std::io::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
        Ok((status, body))
    })?
    .map_err(LabError::Io)
}

/// An HTTP/1.1 request to send over TLS ([`https_exchange`]).
pub struct HttpsRequest<'a> {
    /// `address:port`, as the `Host` header and, without the port, the
    /// name the server's certificate must carry.
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// Sent only when given: the API tests also send bodies without one.
    pub content_type: Option<&'a str>,
    pub body: &'a str,
}

/// Sends `request` over TLS (`config`, which holds the client's own
/// certificate for mutual TLS) on `tcp`, connected to `request.host`, and
/// reads until the server closes: (status, body), status 0 if no HTTP
/// answer came (a handshake refused, a connection reset). A server
/// refusing a body too large answers and closes before the body is all
/// sent: what it answered is still read.
#[must_use]
pub fn https_exchange(
    mut tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    request: &HttpsRequest<'_>,
) -> (u16, String) {
    let HttpsRequest { host, method, path, content_type, body } = *request;
    let server = host.rsplit_once(':').map_or(host, |(address, _)| address).to_owned();
    let Ok(name) = rustls::pki_types::ServerName::try_from(server) else { return (0, String::new()) };
    let Ok(mut connection) = rustls::ClientConnection::new(config, name) else { return (0, String::new()) };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
    let kind = content_type.map(|kind| format!("Content-Type: {kind}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{kind}Content-Length: {}\r\n\r\n",
        body.len()
    );
    let _ = tls.write_all(head.as_bytes()).and_then(|()| tls.write_all(body.as_bytes()));
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// The integer value of one sample in a Prometheus text exposition, e.g.
/// `bulkhead_drop_packets_total{direction="ingress",reason="deny_rule"}`.
/// Every Bulkhead metric is an integer count.
#[must_use]
pub fn metric(text: &str, sample: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse().ok())
}

/// Runs one probe from each `(namespace, target)` at once, TCP or UDP: a
/// blocked one waits out [`BLOCKED_AFTER`] in parallel with the others, so
/// a whole connectivity matrix costs one timeout. Outcomes in input order.
pub fn all_at_once(probes: &[(&Netns, SocketAddr)], udp: bool) -> Result<Vec<Outcome>, LabError> {
    std::thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|&(ns, target)| scope.spawn(move || if udp { self::udp(ns, target) } else { tcp(ns, target) }))
            .collect();
        running
            .into_iter()
            .map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    })
}
