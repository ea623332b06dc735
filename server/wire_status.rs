//! Statuses for bad bytes on the wire. tonic reports a client's framing errors as `INTERNAL`
//! (truncated frame, bad compressed-flag, missing unary message) and an over-long message as
//! `OUT_OF_RANGE`; here they become the status that says whose fault it is and what to do:
//!
//! | what the client sent | tonic says | we say |
//! |---|---|---|
//! | bytes that do not parse as the message (see `proto::codec`) | `INTERNAL` | `INVALID_ARGUMENT` |
//! | a frame cut short by the end of the stream | `INTERNAL` | `INVALID_ARGUMENT` |
//! | compressed-flag other than 0, or 1 without `grpc-encoding` | `INTERNAL` | `INVALID_ARGUMENT` |
//! | a unary call without its message | `INTERNAL` | `INVALID_ARGUMENT` |
//! | a message over `--max-message-bytes` | `OUT_OF_RANGE` | `RESOURCE_EXHAUSTED` (as gRPC core) |
//! | `grpc-encoding` we do not support | `UNIMPLEMENTED` + `grpc-accept-encoding` | unchanged |
//!
//! `INTERNAL` stays reserved for the aggregator's own bugs. (gRPC's compression document asks
//! `INTERNAL` for a compressed-flag without an encoding; we answer `INVALID_ARGUMENT`, the client's
//! error, like every other malformed frame.)
//!
//! Two places apply it: [`classify`] on what an ingest stream's reader returns, and
//! [`ClientErrors`] around a service, for the answers tonic sends before our code runs.

use std::task::{Context, Poll};

use tonic::{
    Code, Status,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};

use crate::proto::metadata::{DESK_HEADER, SITE_HEADER};

/// The status to send for a status that tonic produced while reading a request.
pub fn classify(status: Status) -> Status {
    let msg = status.message();
    match status.code() {
        Code::OutOfRange if msg.starts_with("Error, decoded message length too large") => {
            Status::resource_exhausted(format!("{msg} (the aggregator's --max-message-bytes); send smaller messages"))
        }
        Code::Internal
            if msg.starts_with("protocol error")
                || msg.starts_with("Unexpected EOF")
                || msg.starts_with("Missing request message") =>
        {
            Status::invalid_argument(format!("malformed gRPC framing: {msg}"))
        }
        _ => status,
    }
}

/// Wraps a gRPC service so that the statuses tonic answers before our handler runs
/// (trailers-only responses: unary and server-streaming requests that fail to decode) are
/// [`classify`]d.
#[derive(Debug, Clone)]
pub struct ClientErrors<S>(pub S);

impl<S: NamedService> NamedService for ClientErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> Service<http::Request<B>> for ClientErrors<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Who asked, for the log line of a refusal that tonic makes before our handler runs.
        let header = |name: &str| req.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let (site, desk) = (header(SITE_HEADER), header(DESK_HEADER));
        let path = req.uri().path().to_owned();
        let fut = self.0.call(req);
        Box::pin(async move {
            let mut response = fut.await?;
            if let Some(status) = remap_headers(response.headers_mut()) {
                tracing::info!(
                    site = site.as_deref().unwrap_or("-"), desk = desk.as_deref().unwrap_or("-"), %path,
                    code = ?status.code(), message = status.message(), "call refused before it started"
                );
            }
            Ok(response)
        })
    }
}

/// Rewrites `grpc-status`/`grpc-message` of a trailers-only response, if [`classify`] changes
/// them. Responses without a status in their headers (every normal answer) are untouched.
/// Returns the status when it is one tonic made (remapped here, or `UNIMPLEMENTED`: an unknown
/// method or compression), for the caller to log; our handlers log their own refusals.
fn remap_headers(headers: &mut http::HeaderMap) -> Option<Status> {
    let code = headers.get(Status::GRPC_STATUS)?;
    // Only the codes tonic uses for client framing errors and unsupported calls need a look.
    if !matches!(code.as_bytes(), b"13" | b"11" | b"12") {
        return None;
    }
    let status = Status::from_header_map(headers)?;
    if status.code() == Code::Unimplemented {
        return Some(status);
    }
    let (code, message) = (status.code(), status.message().to_owned());
    let mapped = classify(status);
    if mapped.code() == code && mapped.message() == message {
        return None;
    }
    headers.remove(Status::GRPC_STATUS);
    headers.remove(Status::GRPC_MESSAGE);
    if let Err(e) = mapped.add_header(headers) {
        tracing::warn!(error = %e, "cannot rewrite a gRPC status header");
    }
    Some(mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_errors_become_client_errors_and_others_stay() {
        let cases = [
            (
                Status::internal("protocol error: received message with invalid compression flag: 2"),
                Code::InvalidArgument,
            ),
            (Status::internal("Unexpected EOF decoding stream."), Code::InvalidArgument),
            (Status::internal("Missing request message."), Code::InvalidArgument),
            (
                Status::out_of_range("Error, decoded message length too large: found 9 bytes, the limit is: 8 bytes"),
                Code::ResourceExhausted,
            ),
            (Status::internal("a bug of ours"), Code::Internal),
            (Status::out_of_range("count above the ceiling"), Code::OutOfRange),
            (Status::unimplemented("Content is compressed with `gzip` which isn't supported"), Code::Unimplemented),
        ];
        for (status, want) in cases {
            let what = format!("{status:?}");
            assert_eq!(classify(status).code(), want, "{what}");
        }
    }

    #[test]
    fn trailers_only_headers_are_rewritten() {
        let mut headers = http::HeaderMap::new();
        Status::internal("Unexpected EOF decoding stream.").add_header(&mut headers).expect("valid header");
        let logged = remap_headers(&mut headers).map(|s| s.code());
        assert_eq!(logged, Some(Code::InvalidArgument));
        let status = Status::from_header_map(&headers).expect("still a status");
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("Unexpected EOF"), "{status:?}");

        let mut ok = http::HeaderMap::new();
        ok.insert("content-type", http::HeaderValue::from_static("application/grpc"));
        assert!(remap_headers(&mut ok).is_none());
        assert_eq!(ok.len(), 1, "a normal answer is untouched");
    }
}
