//! What a read token may see: a national token everything, a province token its province and
//! what lies within it (communes, sites), nothing national. Beyond it: PERMISSION_DENIED.

use super::token::{Grant, ReadScope};
use crate::server::{
    error::Error,
    registry::Registry,
    tally::{Level, Node},
};

/// The province (index) a node lies in; `None` for the nation.
pub fn province_of(registry: &Registry, node: Node) -> Option<u32> {
    let i = node.index as usize;
    match node.level {
        Level::National => None,
        Level::Province => Some(node.index),
        Level::Commune => registry.communes.get(i).map(|c| c.province),
        Level::Site => registry.sites.get(i).map(|s| s.province),
    }
}

/// The province index a grant is confined to, or `None` for an unconfined grant (a national
/// read token or a site token). A province code not in the registry confines to nothing.
pub fn confined_to(registry: &Registry, grant: &Grant) -> Option<Result<u32, Error>> {
    match grant {
        Grant::Read(ReadScope::Province(code)) => Some(registry.province(code).ok_or_else(|| {
            Error::PermissionDenied(format!("this token reads province {code:?}, which is not in the registry"))
        })),
        _ => None,
    }
}

/// PERMISSION_DENIED unless `grant` may read `node`.
pub fn allows(registry: &Registry, grant: &Grant, node: Node) -> Result<(), Error> {
    let Some(province) = confined_to(registry, grant) else { return Ok(()) };
    within(registry, province?, node)
}

/// PERMISSION_DENIED unless `node` lies within province index `province`.
pub fn within(registry: &Registry, province: u32, node: Node) -> Result<(), Error> {
    if province_of(registry, node) == Some(province) {
        return Ok(());
    }
    let code = registry.provinces.get(province as usize).map_or("?", |p| p.code.as_str());
    Err(Error::PermissionDenied(format!(
        "this token reads province {code:?} only: ask for that province's figures (scope province {code}) or use a national token"
    )))
}

/// PERMISSION_DENIED for a province token (national-only data: the corrections trail).
pub fn national_only(grant: &Grant) -> Result<(), Error> {
    match grant {
        Grant::Read(ReadScope::Province(code)) => Err(Error::PermissionDenied(format!(
            "this token reads province {code:?} only; this needs a national read token"
        ))),
        _ => Ok(()),
    }
}
