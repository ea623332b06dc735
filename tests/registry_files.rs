//! Registry files as organisers write them (issue 8, "Registries as organisers write them"; issue
//! 9 item 5, the schedule): real files in temporary directories, read by the real loader; and
//! end to end, a server started from such files.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use headcount::{
    proto::schedule::EARLY_CHECK_IN_MS,
    server::registry::{
        Registry,
        csv::{LoadError, LoadOptions, load, load_with, write},
        generate::{GenerateOptions, generate},
    },
};

const HEADER: &str = "site_id,site_name,province_code,province_name,commune_id,commune_name,registered,desks";
const SESSIONS: &str = "session_id,name,starts_at,ends_at\n\
                        1,Ngày 1 — Sáng,2026-12-01 08:00,2026-12-01 11:30\n\
                        2,Ngày 1 — Chiều,2026-12-01 13:30,2026-12-01 17:00\n";
/// 2026-12-01 08:00 in Asia/Ho_Chi_Minh (UTC+7), Unix ms.
const DAY1_0800: i64 = 1_796_086_800_000;
const MINUTE: i64 = 60_000;

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).expect("write a registry file");
        p
    }

    /// Loads `sites` with the standard sessions file.
    fn load(&self, sites: &[u8]) -> Result<Registry, LoadError> {
        load(&self.put("sites.csv", sites), &self.put("sessions.csv", SESSIONS.as_bytes()))
    }

    fn load_sessions(&self, sessions: &str) -> Result<Registry, LoadError> {
        let sites = format!("{HEADER}\nHN001,Hội trường A,01,Hà Nội,01-001,Phường Ba Đình,100,1\n");
        load(&self.put("sites.csv", sites.as_bytes()), &self.put("sessions.csv", sessions.as_bytes()))
    }
}

fn ok(r: Result<Registry, LoadError>) -> Registry {
    r.unwrap_or_else(|e| panic!("expected the registry to load, got: {e}"))
}

/// Asserts a refusal at `line` whose message contains every one of `words`.
fn refused(r: Result<Registry, LoadError>, file: &str, line: u64, words: &[&str]) {
    let e = match r {
        Ok(_) => panic!("expected a refusal at {file}:{line}, the registry loaded"),
        Err(e) => e,
    };
    let text = e.to_string();
    assert_eq!(e.line(), Some(line), "wrong line in: {text}");
    assert!(text.contains(&format!("{file}:{line}: ")), "no {file}:{line} in: {text}");
    for w in words {
        assert!(text.contains(w), "{w:?} missing from: {text}");
    }
}

fn site<'a>(r: &'a Registry, id: &str) -> &'a headcount::server::registry::Site {
    &r.sites[r.site(id).unwrap_or_else(|| panic!("site {id} not loaded")) as usize]
}

/// Windows-1258 bytes of a Vietnamese string as Excel writes it: each letter with its vowel
/// modifier (â ă ê ô ơ ư đ, single bytes in the code page), then its tone as a combining mark.
fn cp1258(s: &str) -> Vec<u8> {
    use unicode_normalization::UnicodeNormalization;
    let mut out = Vec::new();
    for c in s.nfc() {
        let is_tone = |m: &char| ['\u{300}', '\u{301}', '\u{303}', '\u{309}', '\u{323}'].contains(m);
        let tones: Vec<char> = c.to_string().nfd().filter(is_tone).collect();
        let letter: String = c.to_string().nfd().filter(|m| !is_tone(m)).nfc().collect();
        let (bytes, _, unmappable) = encoding_rs::WINDOWS_1258.encode(&letter);
        assert!(!unmappable, "{letter:?} is not in Windows-1258");
        out.extend_from_slice(&bytes);
        for t in tones {
            out.extend_from_slice(&encoding_rs::WINDOWS_1258.encode(&t.to_string()).0);
        }
    }
    out
}

// ───────────────────────────── accepted ─────────────────────────────

#[test]
fn excel_vietnamese_locale_semicolons_windows_1258_crlf_and_empty_rows() {
    let text = "site_id;site_name;province_code;province_name;commune_id;commune_name;registered;desks\r\n\
                HN001;Hội trường Ba Đình;01;Hà Nội;01-001;Phường Ba Đình;1.200;2\r\n\
                HN002;Nhà văn hoá;01;Hà Nội;01-002;Xã Sóc Sơn;\"1,050\";1\r\n\
                ;;;;;;;\r\n;;;;;;;\r\n";
    let f = Files::new();
    let r = ok(f.load(&cp1258(text)));
    assert_eq!(r.sites.len(), 2);
    assert_eq!(r.provinces.len(), 1);
    assert_eq!(r.provinces[0].name, "Hà Nội", "decoded from Windows-1258 and composed to NFC");
    assert_eq!(site(&r, "HN001").name, "Hội trường Ba Đình");
    assert_eq!(site(&r, "HN001").registered, 1200);
    assert_eq!(site(&r, "HN002").registered, 1050);
    assert_eq!(r.registered_total(), 2250);
}

#[test]
fn utf16_with_bom_tab_separated_as_excel_unicode_text() {
    let text =
        format!("{}\r\nHN001\tHội trường\t01\tHà Nội\t01-001\tPhường Ba Đình\t150\t1\r\n", HEADER.replace(',', "\t"));
    let f = Files::new();
    let mut le = vec![0xff, 0xfe];
    le.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
    assert_eq!(site(&ok(f.load(&le)), "HN001").name, "Hội trường");
    let mut be = vec![0xfe, 0xff];
    be.extend(text.encode_utf16().flat_map(u16::to_be_bytes));
    assert_eq!(ok(f.load(&be)).provinces[0].name, "Hà Nội");
}

#[test]
fn utf8_bom_crlf_and_excel_sep_line() {
    let text = format!("\u{feff}sep=,\r\n{HEADER}\r\nHN001,Hội trường,01,Hà Nội,01-001,Phường Ba Đình,150,1\r\n");
    assert_eq!(ok(Files::new().load(text.as_bytes())).sites.len(), 1);
}

#[test]
fn nfd_and_nfc_spellings_of_one_name_are_one_province() {
    use unicode_normalization::UnicodeNormalization;
    let nfd: String = "Hà Nội".nfd().collect();
    assert_ne!(nfd, "Hà Nội");
    let text = format!(
        "{HEADER}\nHN001,A,01,Hà Nội,01-001,Phường Ba Đình,100,1\nHN002,B,01,{nfd},01-001,{},60,1\n",
        "Phường Ba Đình".nfd().collect::<String>()
    );
    let r = ok(Files::new().load(text.as_bytes()));
    assert_eq!((r.provinces.len(), r.communes.len()), (1, 1));
    assert_eq!(r.provinces[0].registered, 160);
}

#[test]
fn columns_in_any_order_with_contacts() {
    let text = "desks,registered,site_id,site_name,contact_name,contact_phone,commune_name,commune_id,province_name,province_code\n\
                2,150,HN001,Hội trường,Nguyễn Văn An,0912 345 678,Phường Ba Đình,01-001,Hà Nội,01\n\
                1,80,HN002,Nhà văn hoá,,,Phường Ba Đình,01-001,Hà Nội,01\n";
    let r = ok(Files::new().load(text.as_bytes()));
    let s = site(&r, "HN001");
    assert_eq!((s.desks, s.registered), (2, 150));
    assert_eq!((s.contact_name.as_str(), s.contact_phone.as_str()), ("Nguyễn Văn An", "0912 345 678"));
    assert_eq!(site(&r, "HN002").contact_name, "");
}

#[test]
fn the_written_reference_registry_reads_back_the_same() {
    let reg = generate(&GenerateOptions { sites: 80, sites_per_commune: 3.0, mean_registered: 150, seed: 3 });
    let f = Files::new();
    let (mut sites, mut sessions) = (Vec::new(), Vec::new());
    write(&reg, &mut sites, &mut sessions).expect("write");
    let back = ok(load(&f.put("sites.csv", &sites), &f.put("sessions.csv", &sessions)));
    assert_eq!(back.sites.len(), reg.sites.len());
    for (a, b) in reg.sites.iter().zip(&back.sites) {
        assert_eq!(
            (&a.id, &a.name, a.registered, a.desks, &a.contact_name, &a.contact_phone),
            (&b.id, &b.name, b.registered, b.desks, &b.contact_name, &b.contact_phone)
        );
    }
    for (a, b) in reg.sessions.iter().zip(&back.sessions) {
        assert_eq!((a.id, &a.name, &a.schedule), (b.id, &b.name, &b.schedule));
    }
    assert_eq!(back.registered_total(), reg.registered_total());
}

// ───────────────────────────── refused, with the physical line ─────────────────────────────

#[test]
fn crlf_and_blank_lines_do_not_shift_the_line_of_a_bad_row() {
    let text = format!(
        "{HEADER}\r\nHN001,A,01,Hà Nội,01-001,X,100,1\r\n\r\n\r\nHN002,B,01,Hà Nội,01-001,X,100,1\r\nHN003,C,01,Hà Nội,01-001,X,many,1\r\n"
    );
    refused(Files::new().load(text.as_bytes()), "sites.csv", 6, &["registered", "\"many\"", "whole number"]);
}

#[test]
fn province_code_that_lost_its_leading_zero() {
    let text = format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,200,1\nHN002,B,1,Hà Nội,01-002,Y,160,1\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 3, &["\"1\"", "\"01\"", "leading zeros", "Text"]);
}

#[test]
fn one_province_name_under_two_codes() {
    let text = format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,200,1\nHN002,B,02,Hà Nội,02-002,Y,160,1\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 3, &["\"Hà Nội\"", "\"02\"", "one province, one code"]);
}

#[test]
fn one_commune_name_under_two_ids_in_a_province() {
    let text =
        format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,Xã Tây Hồ,200,1\nHN002,B,01,Hà Nội,01-002,xã tây hồ,160,1\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 3, &["one commune, one id", "line 2"]);
}

#[test]
fn commune_under_two_provinces() {
    let text = format!(
        "{HEADER}\nHN001,A,01,Hà Nội,01-001,X,200,1\nHCM01,B,79,Hồ Chí Minh,79-001,Y,100,1\nHN002,C,79,Hồ Chí Minh,01-001,X,160,1\n"
    );
    refused(
        Files::new().load(text.as_bytes()),
        "sites.csv",
        4,
        &["commune 01-001", "province 79", "province 01", "line 2"],
    );
}

#[test]
fn commune_whose_id_names_another_province() {
    let text = format!(
        "{HEADER}\nHN001,A,01,Hà Nội,01-001,X,1,1\nHN002,B,01,Hà Nội,01-002,Y,1,1\nHCM01,C,79,Hồ Chí Minh,79-001,Z,1,1\n\
         HCM02,D,79,Hồ Chí Minh,79-002,W,1,1\nHCM03,E,79,Hồ Chí Minh,01-003,V,1,1\n"
    );
    refused(
        Files::new().load(text.as_bytes()),
        "sites.csv",
        6,
        &["commune 01-003", "province 79", "starts with province 01"],
    );
}

#[test]
fn site_id_with_a_non_ascii_letter() {
    let text = format!("{HEADER}\nĐN004,A,04,Đà Nẵng,04-001,X,100,1\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 2, &["\"ĐN004\"", "ASCII", "\"DN004\""]);
}

#[test]
fn site_ids_equal_but_for_leading_zeros() {
    let text = format!("{HEADER}\nS0042,A,01,Hà Nội,01-001,X,100,1\nS042,B,01,Hà Nội,01-001,X,100,1\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 3, &["\"S042\"", "\"S0042\"", "leading zeros"]);
}

#[test]
fn ambiguous_numbers_are_refused_not_guessed() {
    for (value, line) in [("\"1,5\"", 2), ("1.20", 2), ("\"1,200.00\"", 2), ("-3", 2)] {
        let text = format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,{value},1\n");
        refused(Files::new().load(text.as_bytes()), "sites.csv", line, &["registered", "whole number"]);
    }
    let unquoted = format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,1,200,1\n");
    refused(Files::new().load(unquoted.as_bytes()), "sites.csv", 2, &["no name in the header", "1,200"]);
}

#[test]
fn header_problems_are_named() {
    let f = Files::new();
    refused(f.load(b"site_id,name\nHN001,A\n"), "sites.csv", 1, &["header must name", "province_code"]);
    let extra = format!("{},ghi_chu\nHN001,A,01,Hà Nội,01-001,X,100,1,x\n", HEADER);
    refused(f.load(extra.as_bytes()), "sites.csv", 1, &["unknown column \"ghi_chu\""]);
    refused(f.load(format!("{HEADER}\n,,,,,,,\n").as_bytes()), "sites.csv", 1, &["no sites"]);
}

#[test]
fn mixed_encodings_and_utf16_without_bom_are_refused() {
    let mut mixed = format!("{HEADER}\nHN001,Hội trường,01,Hà Nội,01-001,X,100,1\n").into_bytes();
    mixed.extend(cp1258("HN002,Nhà văn hoá,01,Hà Nội,01-001,X,100,1\n"));
    refused(Files::new().load(&mixed), "sites.csv", 3, &["not valid UTF-8", "CSV UTF-8"]);
    let le: Vec<u8> = format!("{HEADER}\n").encode_utf16().flat_map(u16::to_le_bytes).collect();
    let e = Files::new().load(&le).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("UTF-16 without a byte-order mark"), "{e}");
}

#[test]
fn phone_that_lost_its_leading_zero() {
    let text = format!("{HEADER},contact_name,contact_phone\nHN001,A,01,Hà Nội,01-001,X,100,1,An,912345678\n");
    refused(Files::new().load(text.as_bytes()), "sites.csv", 2, &["0912345678", "Text"]);
}

// ───────────────────────────── sessions and the schedule ─────────────────────────────

#[test]
fn schedule_in_the_event_time_zone() {
    let r = ok(Files::new().load_sessions(SESSIONS));
    let w = r.sessions[0].schedule.as_ref().expect("session 1 has times");
    assert_eq!((w.starts_unix_ms, w.ends_unix_ms), (DAY1_0800, DAY1_0800 + 210 * MINUTE));
    assert_eq!(w.time_zone, "Asia/Ho_Chi_Minh");
    // A row's own time zone wins over the default; `T` is accepted too.
    let utc = ok(Files::new()
        .load_sessions("session_id,name,starts_at,ends_at,time_zone\n1,S,2026-12-01T01:00,2026-12-01T04:30,UTC\n"));
    assert_eq!(utc.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    // `--time-zone` for rows without one.
    let f = Files::new();
    let sites = f.put("sites.csv", format!("{HEADER}\nHN001,A,01,Hà Nội,01-001,X,1,1\n").as_bytes());
    let sessions = f.put("sessions.csv", b"session_id,name,starts_at,ends_at\n1,S,2026-12-01 02:00,2026-12-01 03:00\n");
    let r = ok(load_with(&sites, &sessions, &LoadOptions { time_zone: "Europe/Paris".into() }));
    assert_eq!(r.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    // Sessions without times are allowed (never current).
    let none = ok(Files::new().load_sessions("session_id,name\n1,Khai mạc\n"));
    assert!(none.sessions[0].schedule.is_none());
    assert!(none.current_session(DAY1_0800).is_none());
}

#[test]
fn current_session_follows_the_schedule() {
    let r = ok(Files::new().load_sessions(SESSIONS));
    let current = |t: i64| r.current_session(t).map(|s| s.id);
    assert_eq!(current(DAY1_0800 - EARLY_CHECK_IN_MS - 1), None, "before the early check-in of the first");
    assert_eq!(current(DAY1_0800 - EARLY_CHECK_IN_MS), Some(1), "early check-in");
    assert_eq!(current(DAY1_0800 + 60 * MINUTE), Some(1), "running");
    assert_eq!(current(DAY1_0800 + 240 * MINUTE), Some(1), "lunch, more than the margin before the afternoon");
    assert_eq!(current(DAY1_0800 + 280 * MINUTE), Some(2), "within the margin before the afternoon");
    assert_eq!(current(DAY1_0800 + 24 * 60 * MINUTE), Some(2), "after the last: the latest started");
}

#[test]
fn bad_schedules_are_refused_with_their_line() {
    let f = Files::new();
    let head = "session_id,name,starts_at,ends_at,time_zone\n";
    refused(
        f.load_sessions(&format!(
            "{head}1,A,2026-12-01 08:00,2026-12-01 11:30,\n\n2,B,2026-12-01 11:00,2026-12-01 12:00,\n"
        )),
        "sessions.csv",
        4,
        &["overlaps session 1", "line 2"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,2026-12-01 11:30,2026-12-01 08:00,\n")),
        "sessions.csv",
        2,
        &["not after starts_at"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,2026-12-01 08:00,2026-12-01 11:30,Asia/Saigonn\n")),
        "sessions.csv",
        2,
        &["unknown time zone \"Asia/Saigonn\"", "Asia/Ho_Chi_Minh"],
    );
    refused(
        f.load_sessions(&format!("{head}1,A,01/12/2026 08:00,01/12/2026 11:30,\n")),
        "sessions.csv",
        2,
        &["starts_at", "ambiguous", "yyyy-mm-dd"],
    );
    refused(f.load_sessions(&format!("{head}1,A,2026-12-01 08:00,,\n")), "sessions.csv", 2, &["ends_at is empty"]);
    refused(f.load_sessions("session_id,name\n1,A\n1,B\n"), "sessions.csv", 3, &["session_id 1", "line 2"]);
    refused(f.load_sessions("session_id,name\n1,Sáng\n2,sáng\n"), "sessions.csv", 3, &["name \"sáng\"", "line 2"]);
    // A clock change: 02:30 does not exist in New York on 2026-03-08.
    refused(
        f.load_sessions(&format!("{head}1,A,2026-03-08 02:30,2026-03-08 05:00,America/New_York\n")),
        "sessions.csv",
        2,
        &["clock change"],
    );
}

#[test]
fn the_reference_registry_has_a_two_day_schedule() {
    let r = generate(&GenerateOptions { sites: 40, ..GenerateOptions::default() });
    let names: Vec<&str> = r.sessions.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["Ngày 1 — Sáng", "Ngày 1 — Chiều", "Ngày 2 — Sáng", "Ngày 2 — Chiều"]);
    assert_eq!(r.sessions[0].schedule.as_ref().map(|w| w.starts_unix_ms), Some(DAY1_0800));
    assert_eq!(r.sessions[3].schedule.as_ref().map(|w| w.ends_unix_ms), Some(DAY1_0800 + (24 * 60 + 540) * MINUTE));
    assert!(r.sites.iter().all(|s| !s.contact_name.is_empty() && s.contact_phone.starts_with("09")));
}

// ───────────────────────────── end to end ─────────────────────────────

/// A server started from an Excel-style file (semicolons, Windows-1258 with two spellings of one
/// name, CRLF, a quoted thousands separator, empty rows) serves the right totals, a silent site listing carries its
/// contact, and the resume handshake carries the schedule.
#[tokio::test]
async fn server_from_organiser_files_counts_lists_contacts_and_sends_the_schedule() {
    let text = String::from(
        "site_id;site_name;province_code;province_name;commune_id;commune_name;registered;desks;contact_name;contact_phone\r\n\
         HN001;Hội trường;01;Hà Nội;01-001;Phường Ba Đình;\"1,200\";2;Nguyễn Văn An;0912 345 678\r\n\
         HN002;Nhà văn hoá;01;Hà Nội;01-002;Xã Sóc Sơn;160;1;Trần Thị Bình;0987 654 321\r\n\
         HCM01;Hội trường;79;Hồ Chí Minh;79-001;Phường Bến Thành;90;1;Lê Văn Cường;0909 000 111\r\n;;;;;;;;;\r\n",
    );
    let f = Files::new();
    // Windows-1258 as Excel writes it, with one spelling of "Hà" precomposed (0xE0) and the
    // others as `a` + a combining grave (0xCC): the same name once normalised.
    let mut bytes = cp1258(&text);
    let at = bytes.windows(3).position(|w| w == b"Ha\xcc").expect("a decomposed Hà");
    bytes.splice(at..at + 3, *b"H\xe0");
    let registry = ok(load(&f.put("sites.csv", &bytes), &f.put("sessions.csv", SESSIONS.as_bytes())));
    assert_eq!(registry.provinces.len(), 2, "the NFD row is the same province");
    let server = start_server(registry, test_config()).await;
    let ch = server.channel().await;
    let mut hn1 = server.open(&ch, "HN001", 2).await;
    let schedule = &hn1.resume.schedule;
    assert_eq!(schedule.len(), 2);
    assert_eq!(
        (schedule[0].id, schedule[0].name.as_str(), schedule[0].starts_unix_ms, schedule[0].time_zone.as_str()),
        (1, "Ngày 1 — Sáng", DAY1_0800, "Asia/Ho_Chi_Minh")
    );
    assert_eq!(schedule[1].ends_unix_ms, DAY1_0800 + 540 * MINUTE);
    hn1.send_batch(vec![report(1, 1, 200)]).await;
    let mut hn2 = server.open(&ch, "HN002", 1).await;
    hn2.send_batch(vec![report(1, 1, 160)]).await;
    let reader = server.reader().await;
    let hanoi = eventually("Hà Nội counts both sites", DEADLINE, || async {
        let t = reader.totals(province("01"), Some(1)).await;
        if t.count == 360 { Ok(t) } else { Err(format!("{t:?}")) }
    })
    .await;
    assert_eq!((hanoi.name.as_str(), hanoi.registered), ("Hà Nội", 1360));
    let silent = eventually("HCM01 silent, the Hà Nội sites not", DEADLINE, || async {
        let s = reader.silent_sites(None, 0).await;
        let ids: Vec<&str> = s.sites.iter().map(|x| x.site_id.as_str()).collect();
        if ids == ["HCM01"] { Ok(s) } else { Err(format!("{ids:?}")) }
    })
    .await;
    assert_eq!(
        (silent.sites[0].name.as_str(), silent.sites[0].contact_name.as_str(), silent.sites[0].contact_phone.as_str()),
        ("Hội trường", "Lê Văn Cường", "0909 000 111")
    );
}

/// The aggregator binary refuses to start without registry files, says how to fix it, and
/// serves the reference registry only when asked.
#[tokio::test]
async fn server_binary_requires_the_registry_or_an_explicit_reference() {
    let f = Files::new();
    let run = |args: Vec<std::ffi::OsString>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
            .args(["--listen", "127.0.0.1:0", "--in-memory"])
            .args(args)
            .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env_remove("HEADCOUNT_SITES")
            .env_remove("HEADCOUNT_SESSIONS")
            .env_remove("HEADCOUNT_REFERENCE_REGISTRY")
            .kill_on_drop(true)
            .output();
        let out = within("headcount-server exits", out).await.expect("run headcount-server");
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (success, stderr) = run(vec![]).await;
    assert!(!success, "started without a registry");
    assert!(stderr.contains("--sites") && stderr.contains("--reference-registry"), "{stderr}");
    let bad = f.put("bad.csv", format!("{HEADER}\r\n\r\nĐN004,A,04,Đà Nẵng,04-001,X,100,1\r\n").as_bytes());
    let sessions = f.put("sessions.csv", SESSIONS.as_bytes());
    let (success, stderr) = run(vec!["--sites".into(), bad.into(), "--sessions".into(), sessions.into()]).await;
    assert!(!success);
    assert!(stderr.contains("bad.csv:3:") && stderr.contains("\"DN004\""), "{stderr}");
    reference_registry_serves(f.dir.path()).await;
}

/// `--reference-registry` starts and serves the generated registry.
async fn reference_registry_serves(dir: &Path) {
    let addr_file = dir.join("addr");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_headcount-server"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--reference-registry", "--addr-file"])
        .arg(&addr_file)
        .env("HEADCOUNT_AUTH_SECRET", std::str::from_utf8(SECRET).unwrap_or_default())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("spawn headcount-server");
    let addr = eventually("the server writes its address", DEADLINE, || async {
        std::fs::read_to_string(&addr_file).map_err(|e| e.to_string())
    })
    .await;
    let reader = Reader::new(channel_to(&format!("http://{addr}")).await, Some(headcount_read_token()));
    let national = reader.totals(national(), None).await;
    let reference = generate(&GenerateOptions::default());
    assert_eq!(national.registered, reference.registered_total() as i64 * reference.sessions.len() as i64);
    child.start_kill().expect("stop the server");
    let _ = within("server exits", child.wait()).await;
}

fn headcount_read_token() -> String {
    headcount::server::Auth::new(SECRET).expect("secret").read_token("registry-tests")
}
