//! Who may read what: a read (or site) token from the `headcount_token` cookie set by the login
//! form (HttpOnly, SameSite=Strict) or from `Authorization: Bearer <token>` for scripts; with
//! `--http-public`, national and province figures without one (a lobby screen).

use axum::{
    Form,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};
use serde::Deserialize;

use super::{HttpState, error::HttpError};

/// Name of the cookie holding the token.
pub const COOKIE: &str = "headcount_token";

/// What a request may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A valid token: everything.
    Token,
    /// A province read token: that province (index) and what lies within it.
    Province(u32),
    /// No token, public lobby mode: national and province figures only.
    Public,
}

/// The token a request carries (bearer header first, then the cookie).
pub fn token_of(headers: &HeaderMap) -> Option<&str> {
    if let Some(bearer) =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(bearer.trim());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Checks the request's token. Without a valid one: `Public` in lobby mode if the caller allows
/// it (`public_ok`), else 401.
pub fn check(state: &HttpState, headers: &HeaderMap, public_ok: bool) -> Result<Access, HttpError> {
    match token_of(headers).map(|token| state.auth.check(token)) {
        Some(Ok(credential)) => granted(state, &credential),
        _ if public_ok && state.config.public => Ok(Access::Public),
        // Says why (invalid, expired, rotated out, revoked).
        Some(Err(e)) => {
            Err(HttpError::unauthorized(format!("{e}; log in again at /login or send a valid bearer token")))
        }
        None => Err(HttpError::unauthorized(
            "a read token is needed: log in at /login or send `Authorization: Bearer <token>` (mint one with `headcount token read`)",
        )),
    }
}

/// A valid token's access, after its read rate (429 with the wait beyond `--read-rate`).
fn granted(state: &HttpState, credential: &crate::server::auth::Credential) -> Result<Access, HttpError> {
    if let Err(e) = state.auth.quotas().read(&credential.token_id) {
        return Err(HttpError { status: StatusCode::TOO_MANY_REQUESTS, message: e.status().message().to_owned() });
    }
    match crate::server::auth::scope::confined_to(state.agg.registry(), &credential.grant) {
        Some(province) => Ok(Access::Province(province?)),
        None => Ok(Access::Token),
    }
}

/// 403 unless `node` lies within province index `province` (what a province token may read).
pub fn within_province(
    agg: &crate::server::Aggregator,
    province: u32,
    node: crate::server::tally::Node,
) -> Result<(), HttpError> {
    Ok(crate::server::auth::scope::within(agg.registry(), province, node)?)
}

/// 403 for a province token (national-only data such as the corrections trail).
pub fn national_only(access: Access) -> Result<(), HttpError> {
    match access {
        Access::Province(_) => Err(HttpError {
            status: StatusCode::FORBIDDEN,
            message: "this token reads one province only; this needs a national read token".into(),
        }),
        _ => Ok(()),
    }
}

/// A place among the token's live viewers (`--max-watchers-per-token`; 429 beyond it), or `None`
/// without a token (public lobby mode).
pub fn viewer_slot(
    state: &HttpState,
    headers: &HeaderMap,
) -> Result<Option<crate::server::quotas::WatcherSlot>, HttpError> {
    let Some(Ok(credential)) = token_of(headers).map(|t| state.auth.check(t)) else { return Ok(None) };
    state
        .auth
        .quotas()
        .watcher(&credential.token_id)
        .map(Some)
        .map_err(|e| HttpError { status: StatusCode::TOO_MANY_REQUESTS, message: e.what })
}

/// Query of `GET /login`.
#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    /// A token to log in with at once (the link the simulation prints).
    pub token: Option<String>,
}

/// Form of `POST /login`.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The read token.
    pub token: String,
}

/// `GET /login`: the login form, or with `?token=` logs in at once.
pub async fn login_page(State(state): State<HttpState>, Query(q): Query<LoginQuery>) -> Response {
    match q.token {
        Some(token) => log_in(&state, token.trim()),
        None => Html(login_html(None)).into_response(),
    }
}

/// `POST /login` (form field `token`): sets the cookie and goes to the page, or shows the form
/// again with the reason (401).
pub async fn login(State(state): State<HttpState>, Form(form): Form<LoginForm>) -> Response {
    log_in(&state, form.token.trim())
}

fn log_in(state: &HttpState, token: &str) -> Response {
    if let Err(e) = state.auth.verify(token) {
        return (StatusCode::UNAUTHORIZED, Html(login_html(Some(&e.to_string())))).into_response();
    }
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age=604800");
    match HeaderValue::from_str(&cookie) {
        // A token with `;` or spaces would split the cookie: scripts can still use the header.
        Ok(v) if !token.contains([';', ',', ' ', '"', '\\']) => {
            let mut r = Redirect::to("/").into_response();
            r.headers_mut().insert(header::SET_COOKIE, v);
            r
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Html(login_html(Some("this token cannot be stored in a cookie; use `Authorization: Bearer`"))),
        )
            .into_response(),
    }
}

/// `POST /logout`: clears the cookie.
pub async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("headcount_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

fn login_html(error: Option<&str>) -> String {
    let error = error.map_or_else(String::new, |e| format!("<p class=\"error\">{}</p>", escape(e)));
    include_str!("assets/login.html").replace("{{error}}", &error)
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
