//! `headcount provision`: from the registry, one bundle per site for its operator — the agent's
//! config file (`site.toml`, see [`super::site_config`]), its token (`token`, mode 0600), the
//! aggregator's CA (`ca.pem`) and a one-page instruction sheet in Vietnamese (`HUONG-DAN.txt`) —
//! plus one mail-merge CSV for all sites (UTF-8 with BOM, as spreadsheets expect).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use super::{aggregators::ServerList, credentials::CredentialArgs, site_config::SiteConfig};
use crate::server::{
    auth::Grant,
    registry::{self, Registry, Site},
};

/// Flags of `headcount provision`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProvisionArgs {
    /// Registry sites file (as the aggregator's --sites).
    #[arg(long)]
    pub sites: PathBuf,
    /// Registry sessions file (as the aggregator's --sessions).
    #[arg(long)]
    pub sessions: PathBuf,
    /// IANA time zone of session rows without one.
    #[arg(long, default_value = registry::sessions::DEFAULT_TIME_ZONE)]
    pub time_zone: String,
    /// The aggregator's URL as the sites reach it, e.g. `https://headcount.example.vn:50051`; with
    /// several aggregator nodes, all their URLs comma-separated: every site gets every address,
    /// each site's list starting at a different node (rotated by the site's position in the
    /// registry), so the sites spread over the nodes.
    #[arg(long)]
    pub server: String,
    /// The CA certificate that signed the aggregator's certificate (copied into each bundle).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Folder to write the bundles and `mail-merge.csv` into (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Signing keys and validity of the tokens.
    #[command(flatten)]
    pub credentials: CredentialArgs,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProvisionReport {
    /// Bundles written (one per site).
    pub bundles: usize,
    /// The mail-merge file.
    pub mail_merge: PathBuf,
}

/// File names inside a bundle.
pub const CONFIG_FILE: &str = "site.toml";
/// The token file of a bundle.
pub const TOKEN_FILE: &str = "token";
/// The CA copy of a bundle.
pub const CA_FILE: &str = "ca.pem";
/// The instruction sheet of a bundle.
pub const SHEET_FILE: &str = "HUONG-DAN.txt";
/// The mail-merge file in the output folder.
pub const MAIL_MERGE_FILE: &str = "mail-merge.csv";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("cannot write {}: {e}", path.display())
}

/// Writes every bundle and the mail-merge CSV. Errors name the file or flag to fix.
pub fn run(args: &ProvisionArgs) -> Result<ProvisionReport, String> {
    let options = registry::csv::LoadOptions { time_zone: args.time_zone.clone() };
    let registry = registry::csv::load_with(&args.sites, &args.sessions, &options).map_err(|e| e.to_string())?;
    let servers: ServerList = args.server.parse().map_err(|e| format!("--server: {e}"))?;
    let auth = args.credentials.auth()?;
    let ca = args
        .ca
        .as_ref()
        .map(|p| std::fs::read(p).map_err(|e| format!("cannot read --ca {}: {e}", p.display())))
        .transpose()?;
    std::fs::create_dir_all(&args.out).map_err(io(&args.out))?;
    let mail_merge = args.out.join(MAIL_MERGE_FILE);
    let mut csv_bytes = b"\xEF\xBB\xBF".to_vec();
    {
        let mut w = csv::Writer::from_writer(&mut csv_bytes);
        w.write_record([
            "site_id",
            "site_name",
            "province",
            "commune",
            "contact_name",
            "contact_phone",
            "desks",
            "bundle",
            "config_file",
            "token_file",
            "instructions",
            "token_id",
        ])
        .map_err(|e| e.to_string())?;
        for (i, site) in registry.sites.iter().enumerate() {
            let server = rotated(&servers, i);
            let (dir, token_id) = bundle(args, &server, &registry, site, &auth, ca.as_deref())?;
            let province = registry.provinces.get(site.province as usize).map_or("", |p| p.name.as_str());
            let commune = registry.communes.get(site.commune as usize).map_or("", |c| c.name.as_str());
            let show = |f: &str| dir.join(f).display().to_string();
            w.write_record([
                site.id.as_str(),
                &site.name,
                province,
                commune,
                &site.contact_name,
                &site.contact_phone,
                &site.desks.to_string(),
                &dir.display().to_string(),
                &show(CONFIG_FILE),
                &show(TOKEN_FILE),
                &show(SHEET_FILE),
                &token_id,
            ])
            .map_err(|e| e.to_string())?;
        }
        w.flush().map_err(io(&mail_merge))?;
    }
    std::fs::write(&mail_merge, csv_bytes).map_err(io(&mail_merge))?;
    Ok(ProvisionReport { bundles: registry.sites.len(), mail_merge })
}

/// A site id as a folder name: refused if it could leave the output folder.
fn folder_name(id: &str) -> Result<&str, String> {
    if id.is_empty() || id.starts_with('.') || id.contains(['/', '\\', '\0']) {
        return Err(format!("site id {id:?} cannot name a folder; fix it in the sites file"));
    }
    Ok(id)
}

/// The addresses starting at the `i`-th (modulo their count), comma-separated.
pub fn rotated(servers: &ServerList, i: usize) -> String {
    let urls = servers.urls();
    let start = i % urls.len().max(1);
    urls[start..].iter().chain(&urls[..start]).cloned().collect::<Vec<_>>().join(",")
}

fn bundle(
    args: &ProvisionArgs,
    server: &str,
    registry: &Registry,
    site: &Site,
    auth: &crate::server::Auth,
    ca: Option<&[u8]>,
) -> Result<(PathBuf, String), String> {
    let dir = args.out.join(folder_name(&site.id)?);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let token = args.credentials.mint(auth, Grant::Site(site.id.clone()), &site.id)?;
    // Not secret: list it in the revocation file to cut off this one token.
    let token_id = auth.check(&token).map_err(|e| e.to_string())?.token_id;
    write_private(&dir.join(TOKEN_FILE), format!("{token}\n").as_bytes())?;
    if let Some(ca) = ca {
        std::fs::write(dir.join(CA_FILE), ca).map_err(io(&dir.join(CA_FILE)))?;
    }
    let config = SiteConfig {
        server: Some(server.to_owned()),
        site: Some(site.id.clone()),
        desks: Some(site.desks),
        desk: Some(1),
        token: None,
        token_file: Some(TOKEN_FILE.into()),
        ca: ca.map(|_| CA_FILE.into()),
        state_file: Some("state/desk-1.json".into()),
        session: None,
    };
    let toml = toml::to_string(&config).map_err(|e| e.to_string())?;
    let header =
        format!("# Headcount site agent — {} ({})\n# Run: headcount site --config {CONFIG_FILE}\n", site.name, site.id);
    std::fs::write(dir.join(CONFIG_FILE), header + &toml).map_err(io(&dir.join(CONFIG_FILE)))?;
    let province = registry.provinces.get(site.province as usize).map_or("", |p| p.name.as_str());
    std::fs::write(dir.join(SHEET_FILE), sheet(site, province, server, args.credentials.expires))
        .map_err(io(&dir.join(SHEET_FILE)))?;
    Ok((dir, token_id))
}

/// Writes a secret readable by its owner only (0600 on Unix).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// The one-page instruction sheet, in Vietnamese.
pub fn sheet(site: &Site, province: &str, server: &str, valid: std::time::Duration) -> String {
    let days = valid.as_secs() / 86_400;
    let desks = site.desks;
    format!(
        "HƯỚNG DẪN CÀI ĐẶT MÁY ĐIỂM DANH — HEADCOUNT
==========================================

Điểm: {name} (mã điểm {id}), tỉnh/thành {province}
Số bàn điểm danh: {desks}
Máy chủ tổng hợp: {server}

Thư mục này gồm:
  site.toml      cấu hình của máy điểm danh (không cần sửa)
  token          mã truy cập riêng của điểm — GIỮ BÍ MẬT, không gửi cho ai
  ca.pem         chứng chỉ của máy chủ (nếu có)
  HUONG-DAN.txt  tờ hướng dẫn này

Các bước:
 1. Chép cả thư mục này vào máy tính của điểm (ví dụ vào C:\\headcount hoặc ~/headcount).
 2. Mở cửa sổ lệnh trong thư mục đó và chạy:
        headcount site --config site.toml
    Bàn số 2, 3… chạy thêm:  headcount site --config site.toml --desk 2 --state-file state/desk-2.json
 3. Quẹt thẻ hoặc gõ mã đại biểu, mỗi dòng một người. Mỗi đại biểu chỉ được tính một lần mỗi phiên.
 4. Khi mất mạng, cứ tiếp tục điểm danh: số liệu được lưu trên máy (thư mục state/) và tự gửi lại
    khi có mạng. Không xoá thư mục state/.
 5. Cuối phiên, nhấn Ctrl-C và chờ dòng báo đã gửi hết.

Mã truy cập có hiệu lực {days} ngày kể từ khi cấp.
Nếu mất máy hoặc lộ mã truy cập: gọi ngay ban điều hành để thu hồi mã của điểm {id};
điểm sẽ nhận bộ cài đặt mới.
",
        name = site.name,
        id = site.id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_site_gets_every_address_starting_at_another_node() {
        let l: ServerList = "https://a:1,https://b:1,https://c:1".parse().expect("three URLs");
        assert_eq!(rotated(&l, 0), "https://a:1,https://b:1,https://c:1");
        assert_eq!(rotated(&l, 1), "https://b:1,https://c:1,https://a:1");
        assert_eq!(rotated(&l, 5), "https://c:1,https://a:1,https://b:1");
        let one: ServerList = "https://a:1".parse().expect("one URL");
        assert_eq!(rotated(&one, 7), "https://a:1");
    }
}
