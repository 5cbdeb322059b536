//! Records the compiler and candle versions for the environment block of reports.
use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PH_RUSTC_VERSION={version}");
    let lock = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("Cargo.lock");
    let candle = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|t| {
            let i = t.find("name = \"candle-core\"")?;
            let rest = &t[i..];
            let v = rest.lines().nth(1)?.trim();
            Some(
                v.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PH_CANDLE_VERSION={candle}");
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rerun-if-changed=build.rs");
}
