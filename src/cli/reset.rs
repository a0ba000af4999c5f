//! `offshoot branch reset`: the branch made again from a snapshot, same name and
//! address, with a spinner on a terminal.

use anyhow::Result;

use super::progress::Spinner;
use super::{api, AdminApi};

/// Resets `source.branch` to `snapshot` (default the newest); `force` ends the
/// open sessions instead of refusing.
pub fn reset(
    admin: &AdminApi,
    source: &str,
    branch: &str,
    snapshot: Option<&str>,
    force: bool,
) -> Result<()> {
    let body = serde_json::json!({ "snapshot": snapshot, "force": force });
    let path = format!("/api/v1/branches/{source}/{branch}/reset");
    let spinner = Spinner::start(format!("resetting {source}.{branch}"));
    let v = api(admin, "POST", &path, Some(&body.to_string()));
    spinner.finish();
    let v = v?;
    // 202: still going after the proxy's provision_timeout.
    if let Some(msg) = v["error"]["message"].as_str() {
        println!("{msg}; see `offshoot branch list`");
        return Ok(());
    }
    let from = match v["snapshot"].as_str() {
        Some(s) => format!("snapshot {s}"),
        None => "the live source".to_owned(),
    };
    println!(
        "{source}.{branch} reset from {from}; it is {}",
        v["state"].as_str().unwrap_or("?")
    );
    Ok(())
}
