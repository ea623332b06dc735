//! Loading registry files from arbitrary bytes: the input is read both as a sessions file and as a
//! sites file (with a fixed schedule). Checks: nothing panics; a sites file that loads is written
//! back out and reads back to the same registry (ids, names, numbers, contacts).

#![no_main]

use std::path::Path;

use headcount::server::registry::{
    csv::write, generate::reference_sessions, sessions::read_sessions, sites::read_sites,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = read_sessions(data, Path::new("sessions.csv"), "Asia/Ho_Chi_Minh");
    let Ok(registry) = read_sites(data, Path::new("sites.csv"), reference_sessions()) else { return };
    let (mut sites, mut sessions) = (Vec::new(), Vec::new());
    if let Err(e) = write(&registry, &mut sites, &mut sessions) {
        panic!("a loaded registry cannot be written: {e}");
    }
    let back = match read_sites(&sites, Path::new("written.csv"), reference_sessions()) {
        Ok(r) => r,
        Err(e) => panic!("a written registry does not load: {e}\n{}", String::from_utf8_lossy(&sites)),
    };
    assert_eq!(back.sites.len(), registry.sites.len());
    for (a, b) in registry.sites.iter().zip(&back.sites) {
        assert_eq!(
            (&a.id, &a.name, a.registered, a.desks, &a.contact_name, &a.contact_phone, a.province, a.commune),
            (&b.id, &b.name, b.registered, b.desks, &b.contact_name, &b.contact_phone, b.province, b.commune)
        );
    }
    for (a, b) in registry.provinces.iter().zip(&back.provinces) {
        assert_eq!((&a.code, &a.name), (&b.code, &b.name));
    }
    for (a, b) in registry.communes.iter().zip(&back.communes) {
        assert_eq!((&a.id, &a.name, a.province), (&b.id, &b.name, b.province));
    }
});
