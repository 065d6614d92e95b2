//! Network partitions: every node listens on its own 127.x.y.z address, and nftables rules in
//! a table of the harness's own (`inet raftwal_faults_<pid>`, output hook on loopback) drop
//! packets from one node's address to another's. A rule per direction, so a partition can be
//! one-way. Clients connect from 127.0.0.1 and are never cut off.
//!
//! `nft` is installed with apt-get when missing (root only; the command is printed). Without
//! root, or when nft does not work, partitions are unavailable and the caller skips them.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, bail};

/// The harness's nftables table; deleted on drop.
#[derive(Debug)]
pub struct Net {
    table: String,
    /// Directed pairs currently dropped.
    cut: Vec<(Ipv4Addr, Ipv4Addr)>,
}

fn nft(args: &str) -> anyhow::Result<()> {
    let out = Command::new("nft")
        .args(args.split_whitespace())
        .output()
        .with_context(|| format!("run nft {args}"))?;
    if !out.status.success() {
        bail!("nft {args} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn have_nft() -> bool {
    Command::new("nft").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Installs nftables with apt-get when `nft` is missing; says what it does.
fn ensure_nft() -> anyhow::Result<()> {
    if have_nft() {
        return Ok(());
    }
    eprintln!("faults: nft is missing; installing it: apt-get install -y nftables");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "nftables"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::io::stderr())
            .status()
    };
    let ok = install().is_ok_and(|s| s.success());
    if !ok {
        eprintln!("faults: apt-get install failed; running apt-get update -q and trying again");
        let _ = Command::new("apt-get").args(["update", "-q"]).stdout(std::io::stderr()).status();
        let status = install().context("run apt-get")?;
        if !status.success() {
            bail!("apt-get install -y nftables failed ({status})");
        }
    }
    if !have_nft() {
        bail!("nftables was installed but nft does not run");
    }
    Ok(())
}

impl Net {
    /// Sets up the harness's table, or says why partitions cannot be injected.
    pub fn new(root: bool) -> anyhow::Result<Net> {
        if !root {
            bail!("not running as root: nftables rules need root");
        }
        ensure_nft()?;
        let table = format!("raftwal_faults_{}", std::process::id());
        let _ = nft(&format!("delete table inet {table}"));
        nft(&format!("add table inet {table}"))?;
        nft(&format!(
            "add chain inet {table} out {{ type filter hook output priority 0 ; policy accept ; }}"
        ))?;
        Ok(Net { table, cut: Vec::new() })
    }

    /// Drops every packet from `from` to `to` (one direction).
    pub fn cut(&mut self, from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<()> {
        if from == to || self.cut.contains(&(from, to)) {
            return Ok(());
        }
        nft(&format!("add rule inet {} out ip saddr {from} ip daddr {to} drop", self.table))?;
        self.cut.push((from, to));
        Ok(())
    }

    /// Drops traffic both ways between every node of `a` and every node of `b`.
    pub fn split(&mut self, a: &[Ipv4Addr], b: &[Ipv4Addr]) -> anyhow::Result<()> {
        for &x in a {
            for &y in b {
                self.cut(x, y)?;
                self.cut(y, x)?;
            }
        }
        Ok(())
    }

    /// Removes every rule.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if self.cut.is_empty() {
            return Ok(());
        }
        nft(&format!("flush chain inet {} out", self.table))?;
        self.cut.clear();
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {}", self.table));
    }
}
