//! The page and its assets, compiled into the binary (`include_str!`): no CDN, nothing fetched
//! from anywhere but the aggregator. The chart is plain SVG drawn by `app.js`.

use axum::{
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
};

use super::{HttpState, access};

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// `GET /`: the dashboard, or a redirect to `/login` without a token (unless lobby mode).
pub async fn index(State(st): State<HttpState>, headers: HeaderMap) -> Response {
    match access::check(&st, &headers, true) {
        Ok(_) => {
            let mut r = Html(INDEX).into_response();
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
        Err(_) => Redirect::to("/login").into_response(),
    }
}

/// `GET /assets/{file}`: `app.js`, `app.css`.
pub async fn file(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
