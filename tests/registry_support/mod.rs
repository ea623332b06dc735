//! Helpers of the registry-file tests: files in a temporary directory, read by the real loader,
//! and assertions on refusals (file, physical line, words of the message).

#![allow(dead_code)]

use std::path::PathBuf;

use headcount::server::registry::{
    Registry, Site,
    csv::{LoadError, load},
};

pub const HEADER: &str = "site_id,site_name,province_code,province_name,commune_id,commune_name,registered,desks";
pub const SESSIONS_CSV: &str = "session_id,name,starts_at,ends_at\n\
                        1,Ngày 1 — Sáng,2026-12-01 08:00,2026-12-01 11:30\n\
                        2,Ngày 1 — Chiều,2026-12-01 13:30,2026-12-01 17:00\n";
/// 2026-12-01 08:00 in Asia/Ho_Chi_Minh (UTC+7), Unix ms.
pub const DAY1_0800: i64 = 1_796_086_800_000;
pub const MINUTE: i64 = 60_000;

pub struct Files {
    pub dir: tempfile::TempDir,
}

impl Files {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir") }
    }

    pub fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).expect("write a registry file");
        p
    }

    /// Loads `sites` with the standard sessions file.
    pub fn load(&self, sites: &[u8]) -> Result<Registry, LoadError> {
        load(&self.put("sites.csv", sites), &self.put("sessions.csv", SESSIONS_CSV.as_bytes()))
    }

    pub fn load_sessions(&self, sessions: &str) -> Result<Registry, LoadError> {
        let sites = format!("{HEADER}\nHN001,Hội trường A,01,Hà Nội,01-001,Phường Ba Đình,100,1\n");
        load(&self.put("sites.csv", sites.as_bytes()), &self.put("sessions.csv", sessions.as_bytes()))
    }
}

pub fn ok(r: Result<Registry, LoadError>) -> Registry {
    r.unwrap_or_else(|e| panic!("expected the registry to load, got: {e}"))
}

/// Asserts a refusal at `line` whose message contains every one of `words`.
pub fn refused(r: Result<Registry, LoadError>, file: &str, line: u64, words: &[&str]) {
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

pub fn site<'a>(r: &'a Registry, id: &str) -> &'a Site {
    &r.sites[r.site(id).unwrap_or_else(|| panic!("site {id} not loaded")) as usize]
}

/// Windows-1258 bytes of a Vietnamese string as Excel writes it: each letter with its vowel
/// modifier (â ă ê ô ơ ư đ, single bytes in the code page), then its tone as a combining mark.
pub fn cp1258(s: &str) -> Vec<u8> {
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
