//! A raw HTTP/2 gRPC client (the `h2` crate) for tests that need what a well-behaved client
//! never sends: hand-built frames (`flag + len(be u32) + bytes`), bad headers, tiny receive
//! windows, a body that is never read.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream, client::SendRequest};
use tokio::{net::TcpStream, task::JoinHandle};
use tonic::Code;

use super::within;

/// One gRPC frame: flag 0 (not compressed), the message's length, the message.
pub fn frame(msg: &[u8]) -> Bytes {
    frame_raw(0, msg.len() as u32, msg)
}

/// A frame with any flag and any declared length, followed by `bytes` (which need not match).
pub fn frame_raw(flag: u8, declared_len: u32, bytes: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + bytes.len());
    b.put_u8(flag);
    b.put_u32(declared_len);
    b.put_slice(bytes);
    b.freeze()
}

/// An HTTP/2 connection to the aggregator.
pub struct RawConn {
    sender: SendRequest<Bytes>,
    task: JoinHandle<()>,
}

impl Drop for RawConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An open gRPC call.
pub struct RawCall {
    pub send: SendStream<Bytes>,
    pub response: h2::client::ResponseFuture,
}

/// What a call ended with: the messages received, then the status.
#[derive(Debug)]
pub struct Outcome {
    pub messages: Vec<Bytes>,
    pub code: Code,
    pub message: String,
}

impl RawConn {
    /// Connects with the given receive windows (bytes) for each stream and the connection.
    pub async fn connect(addr: SocketAddr, stream_window: u32, connection_window: u32) -> Self {
        let tcp = within("raw TCP connect", TcpStream::connect(addr)).await.expect("connect to the test server");
        let (sender, conn) = within(
            "raw HTTP/2 handshake",
            h2::client::Builder::new()
                .initial_window_size(stream_window)
                .initial_connection_window_size(connection_window)
                .handshake::<_, Bytes>(tcp),
        )
        .await
        .expect("HTTP/2 handshake");
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Self { sender, task }
    }

    /// Starts a call to `path` (e.g. `/headcount.v1.Ingest/Report`) with gRPC's headers plus
    /// `headers` (raw bytes: values need not be ASCII).
    pub async fn call(&self, path: &str, headers: &[(&str, &[u8])]) -> RawCall {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in headers {
            req = req.header(*k, http::HeaderValue::from_bytes(v).expect("header value without control bytes"));
        }
        let req = req.body(()).expect("request");
        let mut sender = within("HTTP/2 stream slot", self.sender.clone().ready()).await.expect("connection open");
        let (response, send) = sender.send_request(req, false).expect("send request headers");
        RawCall { send, response }
    }
}

impl RawCall {
    /// Sends bytes on the request body (`end`: half-close after them). False if the server had
    /// already ended the stream (e.g. refused it at once).
    pub fn send(&mut self, bytes: Bytes, end: bool) -> bool {
        self.send.send_data(bytes, end).is_ok()
    }

    /// Reads the whole response: every gRPC message, then the status (from the trailers, or
    /// from the headers of a trailers-only answer).
    pub async fn finish(self) -> Outcome {
        let response = within("response headers", self.response).await.expect("response headers");
        let (parts, body) = response.into_parts();
        if let Some(code) = parts.headers.get("grpc-status") {
            return outcome(Vec::new(), code.as_bytes(), &parts.headers);
        }
        read_to_end(body).await
    }
}

async fn read_to_end(mut body: RecvStream) -> Outcome {
    let mut buf = BytesMut::new();
    while let Some(chunk) = within("response data", body.data()).await {
        let chunk = chunk.expect("response data");
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
    }
    let trailers = within("response trailers", body.trailers()).await.expect("trailers").unwrap_or_default();
    let mut messages = Vec::new();
    let mut rest = buf.freeze();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(rest.len() >= 5 + len, "the aggregator sent a truncated frame");
        messages.push(rest.slice(5..5 + len));
        rest = rest.slice(5 + len..);
    }
    let code = trailers.get("grpc-status").map_or(&b"missing"[..], |v| v.as_bytes());
    outcome(messages, code, &trailers)
}

fn outcome(messages: Vec<Bytes>, code: &[u8], headers: &http::HeaderMap) -> Outcome {
    let code = std::str::from_utf8(code).ok().and_then(|c| c.parse::<i32>().ok()).map_or(Code::Unknown, Code::from_i32);
    let message = headers.get("grpc-message").map(|m| percent_decode(m.as_bytes())).unwrap_or_default();
    Outcome { messages, code, message }
}

/// Decodes the percent-encoding of `grpc-message`.
fn percent_decode(b: &[u8]) -> String {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
