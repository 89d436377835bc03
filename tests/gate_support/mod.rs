//! Shared by the `gate_*` tests: serve a router on 127.0.0.1:0, and a raw
//! HTTP/1.1 client that sends exactly the bytes a test names (empty path
//! segments, percent-encoding, a tab in a header, HEAD).

#![allow(dead_code)]

use std::net::SocketAddr;

use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serve `app` on 127.0.0.1:0 in the background; its address.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    addr
}

/// A parsed answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// A header's value (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// The request's bytes: `method path`, `x-api-key: key` when given (raw
/// bytes, tabs and all), `Connection: close`, and `body`.
pub fn request_bytes(method: &str, path: &str, key: Option<&[u8]>, body: &str) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n")
        .into_bytes();
    if let Some(key) = key {
        out.extend_from_slice(b"x-api-key: ");
        out.extend_from_slice(key);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    out
}

/// Send one request and read the whole answer.
pub async fn send(addr: SocketAddr, method: &str, path: &str, key: Option<&str>) -> Answer {
    send_bytes(
        addr,
        &request_bytes(method, path, key.map(str::as_bytes), ""),
    )
    .await
}

/// Send raw request bytes and read the whole answer.
pub async fn send_bytes(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Poll `done` up to 500 times, 10 ms apart (no test asserts a time: this
/// only bounds how long a broken build hangs); whether it came true.
pub async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..500 {
        if done() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    done()
}
