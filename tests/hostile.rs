//! Hostile input: every case is sent as raw HTTP/2 (hand-built gRPC frames, any header bytes) to
//! a real aggregator on 127.0.0.1, and must get its exact gRPC status (and, for reports, its
//! exact rejection codes) while a digest of all state — every register, every scope × session
//! total, the applied-report counter and the audit trail — stays unchanged.
//!
//! Registry-file cases (bad sites/sessions files refused at start) live with the registry's own
//! tests; this table covers the network surface: identity metadata, per-report values, framing,
//! Totals requests and Watch requests.

mod common;

use std::hash::{DefaultHasher, Hash, Hasher};

use bytes::Bytes;
use common::{raw::*, *};
use headcount::{
    proto::v1::{
        Report, ReportBatch, ReportRequest, ReportResponse, ScopeKind, TotalsRequest, WatchRequest, report_request,
        report_response,
    },
    server::{
        Aggregator, Auth,
        limits::{MAX_TOTALS_REQUEST, largest_ack},
        tally::{Level, Node},
    },
};
use prost::Message;
use tonic::Code;

/// Request headers: name, raw value bytes.
type Headers = Vec<(&'static str, Vec<u8>)>;

const INGEST: &str = "/headcount.v1.Ingest/Report";
const TOTALS: &str = "/headcount.v1.Totals/GetTotals";

/// A hash over every register, every node's count, registered and over-capacity per session and
/// for all sessions, the applied-report counter and the audit trail. Liveness (reporting, last
/// seen) and the rejected/batch counters are left out: hostile streams may move them.
fn digest(agg: &Aggregator) -> u64 {
    let mut h = DefaultHasher::new();
    let mut regs: Vec<_> =
        agg.shared().registers.snapshot().into_iter().map(|(k, r)| (k.packed(), r.seq, r.count)).collect();
    regs.sort_unstable();
    regs.hash(&mut h);
    let r = agg.registry();
    let levels = [
        (Level::National, 1),
        (Level::Province, r.provinces.len()),
        (Level::Commune, r.communes.len()),
        (Level::Site, r.sites.len()),
    ];
    for (level, n) in levels {
        for index in 0..n as u32 {
            for session in std::iter::once(None).chain((0..r.sessions.len()).map(Some)) {
                let t = agg.totals_of(Node { level, index }, session);
                (t.count, t.registered, t.sites_over_capacity).hash(&mut h);
            }
        }
    }
    agg.stats().applied.hash(&mut h);
    for c in agg.shared().audit.all() {
        (c.site_id, c.desk, c.session, c.seq, c.count).hash(&mut h);
    }
    h.finish()
}

/// What a case must end with: the acks (each as its rejection codes) and the status.
#[derive(Debug, Clone, PartialEq)]
struct Want {
    acks: Vec<Vec<Code>>,
    status: Code,
}

fn status(code: Code) -> Want {
    Want { acks: vec![], status: code }
}
fn ack(codes: &[Code]) -> Want {
    Want { acks: vec![codes.to_vec()], status: Code::Ok }
}

struct Case {
    name: String,
    path: &'static str,
    headers: Headers,
    body: Bytes,
    want: Want,
}

fn enc(m: &impl Message) -> Vec<u8> {
    m.encode_to_vec()
}
fn batch_msg(reports: Vec<Report>) -> Vec<u8> {
    enc(&ReportRequest { kind: Some(report_request::Kind::Batch(ReportBatch { reports })) })
}
fn rep(session: u32, seq: u64, count: i64, reason: &str) -> Report {
    Report { session, seq, count, reason: reason.to_owned() }
}

/// Runs one case and returns what it got: the acks' rejection codes, the status, the message.
async fn run(conn: &RawConn, case: &Case) -> (Want, String, usize) {
    let headers: Vec<(&str, &[u8])> = case.headers.iter().map(|(k, v)| (*k, v.as_slice())).collect();
    let mut call = conn.call(case.path, &headers).await;
    let _ = call.send(case.body.clone(), true);
    let out = call.finish().await;
    let mut acks = Vec::new();
    let mut largest = 0;
    if case.path == INGEST {
        for m in &out.messages {
            match ReportResponse::decode(m.clone()).map(|r| r.kind) {
                Ok(Some(report_response::Kind::Ack(a))) => {
                    largest = largest.max(m.len());
                    acks.push(a.rejections.iter().map(|r| Code::from_i32(r.code)).collect());
                }
                Ok(Some(report_response::Kind::Resume(_))) => {}
                other => panic!("{}: unexpected ingest message {other:?}", case.name),
            }
        }
    }
    (Want { acks, status: out.code }, out.message, largest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_their_exact_status_and_change_nothing() {
    let ts = start_small().await;
    let max_count = test_config().max_count;
    let max_batch = test_config().max_batch;
    let max_msg = headcount::server::Transport::default().max_message_bytes;
    // Seed real state so that the digest has something to protect.
    let ch = ts.channel().await;
    for n in 0..8 {
        let (_, id) = ts.site_with_desks(1, n);
        let mut st = ts.open(&ch, &id, 1).await;
        st.send_batch(vec![report(1, 5, 10), report(2, 3, 7 + n as i64)]).await;
        st.send_batch(vec![correction(2, 4, 6, "double scan")]).await;
    }
    let (_, a) = ts.site_with_desks(1, 0);
    let (_, b) = ts.site_with_desks(1, 1);
    let desks = ts.registry.sites[ts.registry.site(&a).expect("site a") as usize].desks;
    let token = ts.site_token(&a);
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let read = bearer(&ts.read_token());
    let forged = bearer(&Auth::new(b"another secret, just as long").expect("secret").site_token(&a));
    let me = || {
        vec![
            ("authorization", bearer(&token)),
            ("x-headcount-site", a.clone().into_bytes()),
            ("x-headcount-desk", b"1".to_vec()),
        ]
    };
    let who = |auth: Option<Vec<u8>>, site: Option<&[u8]>, desk: Option<&[u8]>| {
        let mut h = Vec::new();
        if let Some(v) = auth {
            h.push(("authorization", v));
        }
        if let Some(v) = site {
            h.push(("x-headcount-site", v.to_vec()));
        }
        if let Some(v) = desk {
            h.push(("x-headcount-desk", v.to_vec()));
        }
        h
    };
    let reader = || vec![("authorization", read.clone())];
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &str, path: &'static str, headers: Headers, body: Bytes, want: Want| {
        cases.push(Case { name: name.to_owned(), path, headers, body, want });
    };
    let nothing = Bytes::new;
    let sa = Some(a.as_bytes());

    // ── identity metadata (the stream is refused before it exists) ──
    use Code::*;
    let over = (desks + 1).to_string();
    let half = token[..token.len() / 2].to_owned();
    let tampered = format!("{token}0");
    let lower = a.to_lowercase();
    let ghost_token = ts.site_token(&lower);
    let huge = "x".repeat(8000);
    let agent = |id: &[u8]| [me(), vec![("x-headcount-agent", id.to_vec())]].concat();
    let id_cases: Vec<(&str, Headers, Code)> = vec![
        ("no authorization", who(None, sa, Some(b"1")), Unauthenticated),
        ("empty bearer", who(Some(b"Bearer ".to_vec()), sa, Some(b"1")), Unauthenticated),
        ("basic scheme", who(Some(b"Basic dXNlcjpwYXNz".to_vec()), sa, Some(b"1")), Unauthenticated),
        ("garbage token", who(Some(bearer("not-a-token")), sa, Some(b"1")), Unauthenticated),
        ("token of another secret", who(Some(forged.clone()), sa, Some(b"1")), Unauthenticated),
        ("tampered token", who(Some(bearer(&tampered)), sa, Some(b"1")), Unauthenticated),
        ("truncated token", who(Some(bearer(&half)), sa, Some(b"1")), Unauthenticated),
        ("8 KB token", who(Some(bearer(&huge)), sa, Some(b"1")), Unauthenticated),
        ("authorization not ASCII", who(Some(b"Bearer \xc4\x90N004".to_vec()), sa, Some(b"1")), Unauthenticated),
        ("token of A for site B", who(Some(bearer(&token)), Some(b.as_bytes()), Some(b"1")), PermissionDenied),
        ("read token reporting", who(Some(read.clone()), sa, Some(b"1")), PermissionDenied),
        ("empty site header", who(Some(bearer(&token)), Some(b""), Some(b"1")), PermissionDenied),
        ("no site header", who(Some(bearer(&token)), None, Some(b"1")), InvalidArgument),
        ("site header not ASCII", who(Some(bearer(&token)), Some(b"\xc4\x90N004"), Some(b"1")), InvalidArgument),
        ("unknown site, own token", who(Some(bearer(&ghost_token)), Some(lower.as_bytes()), Some(b"1")), NotFound),
        ("desk 0", who(Some(bearer(&token)), sa, Some(b"0")), NotFound),
        ("desk above the site's", who(Some(bearer(&token)), sa, Some(over.as_bytes())), NotFound),
        ("desk 65537", who(Some(bearer(&token)), sa, Some(b"65537")), NotFound),
        ("desk not a number", who(Some(bearer(&token)), sa, Some(b"two")), InvalidArgument),
        ("desk negative", who(Some(bearer(&token)), sa, Some(b"-1")), InvalidArgument),
        ("desk over u32", who(Some(bearer(&token)), sa, Some(b"4294967296")), InvalidArgument),
        ("desk fractional", who(Some(bearer(&token)), sa, Some(b"1.5")), InvalidArgument),
        ("desk not ASCII", who(Some(bearer(&token)), sa, Some(b"\xd9\xa1")), InvalidArgument),
        ("agent id not ASCII", agent(b"\xc4\x90-laptop"), InvalidArgument),
        ("agent id empty", agent(b""), InvalidArgument),
        ("agent id of 65 bytes", agent(&[b'a'; 65]), InvalidArgument),
        ("agent id with a space", agent(b"front desk"), InvalidArgument),
        ("agent id with a slash", agent(b"../etc"), InvalidArgument),
    ];
    for (name, headers, code) in id_cases {
        add(&format!("identity: {name}"), INGEST, headers, nothing(), status(code));
    }

    // ── per-report values (the stream stays open; the ack says what was refused) ──
    let f = |m: Vec<u8>| frame(&m);
    let long = "x".repeat(test_config().max_reason + 1);
    let long_multibyte = "é".repeat(test_config().max_reason / 2 + 1);
    let r_cases: Vec<(&str, Vec<Report>, Vec<Code>)> = vec![
        ("seq 0", vec![rep(1, 0, 10, "")], vec![InvalidArgument]),
        ("negative count", vec![rep(1, 6, -1, "")], vec![InvalidArgument]),
        ("count i64::MIN", vec![rep(1, 6, i64::MIN, "")], vec![InvalidArgument]),
        ("count one above the ceiling", vec![rep(1, 6, max_count + 1, "")], vec![OutOfRange]),
        ("count i64::MAX", vec![rep(1, 6, i64::MAX, "")], vec![OutOfRange]),
        ("session 0", vec![rep(0, 6, 1, "")], vec![NotFound]),
        ("session 99", vec![rep(99, 6, 1, "")], vec![NotFound]),
        ("session u32::MAX", vec![rep(u32::MAX, 6, 1, "")], vec![NotFound]),
        ("reason one byte too long", vec![rep(1, 6, 3, &long)], vec![InvalidArgument]),
        ("multi-byte reason too long", vec![rep(1, 6, 3, &long_multibyte)], vec![InvalidArgument]),
        ("same seq, other count", vec![rep(1, 5, 11, "")], vec![Aborted]),
        ("duplicate", vec![rep(1, 5, 10, "")], vec![]),
        ("stale seq", vec![rep(1, 4, 99, "")], vec![]),
        ("empty batch", vec![], vec![]),
        (
            "mixed bad reports",
            vec![rep(1, 0, 1, ""), rep(0, 6, 1, ""), rep(1, 6, -5, "")],
            vec![InvalidArgument, NotFound, InvalidArgument],
        ),
        ("seq u64::MAX, negative count", vec![rep(1, u64::MAX, -1, "")], vec![InvalidArgument]),
        (
            "one report over the batch limit",
            (1..=max_batch as u64 + 1).map(|s| rep(1, s, 1, "")).collect(),
            vec![InvalidArgument],
        ),
        ("20,000 empty reports", vec![Report::default(); 20_000], vec![InvalidArgument]),
        ("a full batch, all refused", vec![Report::default(); max_batch], vec![NotFound; max_batch]),
    ];
    for (name, reports, codes) in r_cases {
        add(&format!("report: {name}"), INGEST, me(), f(batch_msg(reports)), ack(&codes));
    }
    let heartbeat = enc(&ReportRequest { kind: Some(report_request::Kind::Heartbeat(Default::default())) });
    add("report: heartbeat only (not answered)", INGEST, me(), f(heartbeat), status(Code::Ok));

    // ── framing (the stream ends with the status that says why) ──
    let bad_utf8: &[u8] =
        &[0x0a, 0x10, 0x0a, 0x0e, 0x08, 0x01, 0x10, 0x06, 0x18, 0x03, 0x22, 0x06, 0xff, 0xfe, 0x20, 0x62, 0x61, 0x64];
    let over_limit = vec![0u8; max_msg + 1];
    let dup_then_garbage = [frame(&batch_msg(vec![rep(1, 5, 10, "")])), frame(&[0xff; 8])].concat();
    let gz = |v: &'static [u8]| [me(), vec![("grpc-encoding", v.to_vec())]].concat();
    let fr_cases: Vec<(&str, Headers, Bytes, Want)> = vec![
        ("truncated protobuf", me(), frame(&hex("0a080a0608011006")), status(InvalidArgument)),
        ("reason not UTF-8", me(), frame(bad_utf8), status(InvalidArgument)),
        ("message one byte over the limit", me(), frame(&over_limit), status(ResourceExhausted)),
        ("declared length 4 GiB", me(), frame_raw(0, u32::MAX, b"abc"), status(ResourceExhausted)),
        ("compressed flag without encoding", me(), frame_raw(1, 2, &[0x12, 0x00]), status(InvalidArgument)),
        ("compressed flag 2", me(), frame_raw(2, 2, &[0x12, 0x00]), status(InvalidArgument)),
        ("frame cut short", me(), frame_raw(0, 100, &[0x0a; 10]), status(InvalidArgument)),
        ("frame header cut short", me(), Bytes::from_static(&[0, 0, 0]), status(InvalidArgument)),
        ("grpc-encoding gzip", gz(b"gzip"), frame(&heartbeat_bytes()), status(Unimplemented)),
        ("grpc-encoding br", gz(b"br"), frame(&heartbeat_bytes()), status(Unimplemented)),
        ("empty request", me(), frame(&[]), status(InvalidArgument)),
        ("only unknown fields", me(), frame(&[0x78, 0x01]), status(InvalidArgument)),
        ("batch field as a varint", me(), frame(&[0x08, 0x01]), status(InvalidArgument)),
        (
            "11-byte varint",
            me(),
            frame(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            status(InvalidArgument),
        ),
        ("length beyond the message", me(), frame(&[0x0a, 0x7f, 0x00]), status(InvalidArgument)),
        ("group wire type", me(), frame(&[0x0b, 0x0c]), status(InvalidArgument)),
        (
            "a duplicate, then garbage",
            me(),
            Bytes::from(dup_then_garbage),
            Want { acks: vec![vec![]], status: InvalidArgument },
        ),
        ("unknown method", me(), nothing(), status(Unimplemented)),
    ];
    for (name, headers, body, want) in fr_cases {
        let path = if name == "unknown method" { "/headcount.v1.Ingest/Nope" } else { INGEST };
        add(&format!("framing: {name}"), path, headers, body, want);
    }

    // ── Totals ──
    let tr = |kind: ScopeKind, id: &str, session: Option<u32>| {
        frame(&enc(&TotalsRequest {
            scope: Some(headcount::proto::v1::Scope { kind: kind as i32, id: id.into() }),
            session,
            min_revision: 0,
        }))
    };
    let (_, site_id) = ts.site_with_desks(1, 0);
    let bad_id: &[u8] = &[0x0a, 0x06, 0x08, 0x02, 0x12, 0x02, 0xff, 0xfe];
    let negative_kind = [&[0x0a, 0x0b, 0x08][..], &[0xff; 9], &[0x01]].concat();
    let big = vec![0u8; max_msg + 1];
    use ScopeKind as K;
    let t_cases: Vec<(&str, &'static str, Headers, Bytes, Code)> = vec![
        ("32 × 0xff", TOTALS, reader(), frame(&[0xff; 32]), InvalidArgument),
        ("scope id not UTF-8", TOTALS, reader(), frame(bad_id), InvalidArgument),
        ("unknown scope kind", TOTALS, reader(), frame(&[0x0a, 0x02, 0x08, 0x63]), InvalidArgument),
        ("negative scope kind", TOTALS, reader(), frame(&negative_kind), InvalidArgument),
        ("unknown province", TOTALS, reader(), tr(K::Province, "99", None), NotFound),
        ("unknown commune", TOTALS, reader(), tr(K::Commune, "nope", None), NotFound),
        ("unknown site", TOTALS, reader(), tr(K::Site, "S99999", None), NotFound),
        ("unknown session", TOTALS, reader(), tr(K::National, "", Some(99)), NotFound),
        ("no token", TOTALS, vec![], tr(K::National, "", None), Unauthenticated),
        (
            "bad token",
            TOTALS,
            vec![("authorization", b"Bearer nope".to_vec())],
            tr(K::National, "", None),
            Unauthenticated,
        ),
        ("no message", TOTALS, reader(), nothing(), InvalidArgument),
        ("frame cut short", TOTALS, reader(), frame_raw(0, 50, &[0x0a]), InvalidArgument),
        ("over the message limit", TOTALS, reader(), frame(&big), ResourceExhausted),
        ("a request of exactly 16 KiB", TOTALS, reader(), frame(&totals_of_size(MAX_TOTALS_REQUEST)), NotFound),
        (
            "a request of 16 KiB + 1",
            TOTALS,
            reader(),
            frame(&totals_of_size(MAX_TOTALS_REQUEST + 1)),
            ResourceExhausted,
        ),
        ("compressed flag without encoding", TOTALS, reader(), frame_raw(1, 0, &[]), InvalidArgument),
        ("national, well formed", TOTALS, reader(), tr(K::National, "", None), Code::Ok),
        (
            "breakdown of a site",
            "/headcount.v1.Totals/Breakdown",
            reader(),
            tr(K::Site, &site_id, None),
            InvalidArgument,
        ),
        ("breakdown order 7", "/headcount.v1.Totals/Breakdown", reader(), frame(&[0x18, 0x07]), InvalidArgument),
        (
            "curve of a commune",
            "/headcount.v1.Totals/Curve",
            reader(),
            tr(K::Commune, &ts.registry.communes[0].id, None),
            InvalidArgument,
        ),
        ("curve of a site", "/headcount.v1.Totals/Curve", reader(), tr(K::Site, &site_id, None), InvalidArgument),
        (
            "silent sites of an unknown province",
            "/headcount.v1.Totals/SilentSites",
            reader(),
            tr(K::Province, "99", None),
            NotFound,
        ),
        ("corrections, garbage", "/headcount.v1.Totals/Corrections", reader(), frame(&[0xff; 4]), InvalidArgument),
        ("stats, garbage", "/headcount.v1.Totals/Stats", reader(), frame(&[0x0a, 0x05]), InvalidArgument),
    ];
    for (name, path, headers, body, code) in t_cases {
        add(&format!("totals: {name}"), path, headers, body, status(code));
    }

    // ── Watch (refused before the first update) ──
    const WATCH: &str = "/headcount.v1.Totals/Watch";
    let w = |kind: ScopeKind, id: &str, session: Option<u32>, children: bool| {
        let scope = Some(headcount::proto::v1::Scope { kind: kind as i32, id: id.into() });
        frame(&enc(&WatchRequest { scope, session, include_children: children }))
    };
    let w_cases: Vec<(&str, Headers, Bytes, Code)> = vec![
        ("garbage", reader(), frame(&[0xff; 32]), InvalidArgument),
        ("no message", reader(), nothing(), InvalidArgument),
        ("scope id not UTF-8", reader(), frame(bad_id), InvalidArgument),
        ("unknown province", reader(), w(K::Province, "99", None, false), NotFound),
        ("unknown session", reader(), w(K::National, "", Some(7), false), NotFound),
        ("children of a site", reader(), w(K::Site, &site_id, None, true), InvalidArgument),
        ("no token", vec![], w(K::National, "", None, false), Unauthenticated),
    ];
    for (name, headers, body, code) in w_cases {
        add(&format!("watch: {name}"), WATCH, headers, body, status(code));
    }

    assert!(cases.len() >= 60, "{} cases", cases.len());
    let conn = RawConn::connect(ts.addr(), 1 << 20, 1 << 22).await;
    let before = digest(&ts.server.aggregator);
    let mut failures = Vec::new();
    for case in &cases {
        let (got, message, largest_ack_bytes) = run(&conn, case).await;
        if got != case.want {
            failures.push(format!("{}: want {:?}, got {got:?} ({message})", case.name, case.want));
        }
        assert!(largest_ack_bytes <= largest_ack(max_batch), "{}: an ack of {largest_ack_bytes} bytes", case.name);
        if digest(&ts.server.aggregator) != before {
            failures.push(format!("{}: the state changed", case.name));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// A GetTotals request of exactly `size` bytes: a province id that fills it.
fn totals_of_size(size: usize) -> Vec<u8> {
    let mut len = size - 8;
    loop {
        let scope = headcount::proto::v1::Scope { kind: ScopeKind::Province as i32, id: "9".repeat(len) };
        let msg = enc(&TotalsRequest { scope: Some(scope), session: None, min_revision: 0 });
        match msg.len().cmp(&size) {
            std::cmp::Ordering::Equal => return msg,
            std::cmp::Ordering::Greater => len -= 1,
            std::cmp::Ordering::Less => len += 1,
        }
    }
}

fn heartbeat_bytes() -> Vec<u8> {
    enc(&ReportRequest { kind: Some(report_request::Kind::Heartbeat(Default::default())) })
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex literal")).collect()
}
