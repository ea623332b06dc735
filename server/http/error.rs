//! The HTTP side's error answer: a status code and a JSON body `{"error": "…"}` saying what to do.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::server::error::Error;

/// An HTTP error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// Status code.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl HttpError {
    /// 401: no valid token.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, message: message.into() }
    }

    /// 400: a malformed query.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

/// The aggregator's errors map as their gRPC codes do: unknown scope or session 404, malformed
/// 400, bad token 401, forbidden 403, anything else 503.
impl From<Error> for HttpError {
    fn from(e: Error) -> Self {
        let status = match e.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => StatusCode::BAD_REQUEST,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self { status, message: e.to_string() }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(serde_json::json!({ "error": self.message }))).into_response()
    }
}
