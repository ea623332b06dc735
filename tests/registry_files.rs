//! Registry files as organisers write them (issue 8, "Registries as organisers write them"):
//! real files in temporary directories, read by the real loader; what is accepted, and what is
//! refused with its physical `file:line` and a fix.

mod registry_support;

use headcount::server::registry::{
    csv::{load, write},
    generate::{GenerateOptions, generate},
};
use registry_support::*;

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
