//! Generates a development cluster CA and one certificate + key per node.
//!
//! ```text
//! cargo run --release --example gen_certs -- --out certs/dev --names primary,replica-1,replica-2
//! ```
//!
//! Writes `OUT/ca.pem`, and `OUT/NAME.pem` + `OUT/NAME.key` (mode 0600) for each name: the layout
//! that `--certs OUT --name NAME` of the example binaries and `NodeIdentity::load` expect. A new CA
//! is made on every run, so all nodes of a cluster must get their files from the same run. See
//! certs/README.md for using your own CA instead.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use walship::net::tls::{cert_path, key_path, ClusterCa, CA_CERT_FILE, CA_KEY_FILE};

#[derive(Debug, Parser)]
#[command(about = "Generate a development CA and node certificates for walship (mutual TLS)")]
struct Args {
    /// Folder to write into (created if missing).
    #[arg(long, default_value = "certs/dev")]
    out: PathBuf,
    /// Comma-separated node names; each becomes a certificate's DNS name and file name.
    #[arg(long, value_delimiter = ',', default_value = "primary,replica-1,replica-2")]
    names: Vec<String>,
    /// Common name of the generated CA.
    #[arg(long, default_value = "walship development CA")]
    ca_name: String,
    /// Also write the CA private key to OUT/ca.key (mode 0600). Not needed by the nodes; keep it
    /// off them.
    #[arg(long)]
    write_ca_key: bool,
    /// Overwrite existing files in OUT (certificates from an earlier run stop working with the
    /// new CA).
    #[arg(long)]
    force: bool,
}

fn run(args: &Args) -> Result<(), String> {
    let names: Vec<&str> = args.names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()).collect();
    if names.is_empty() {
        return Err("--names is empty: give at least one node name".into());
    }
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(format!("node name {n:?} is given twice"));
        }
    }

    let mut targets = vec![args.out.join(CA_CERT_FILE)];
    if args.write_ca_key {
        targets.push(args.out.join(CA_KEY_FILE));
    }
    for n in &names {
        targets.push(cert_path(&args.out, n));
        targets.push(key_path(&args.out, n));
    }
    if !args.force {
        let existing: Vec<String> = targets.iter().filter(|p| p.exists()).map(|p| p.display().to_string()).collect();
        if !existing.is_empty() {
            return Err(format!(
                "refusing to overwrite {} (a new CA would invalidate the certificates already \
                 handed out); pass --force to replace them, or choose another --out",
                existing.join(", ")
            ));
        }
    }

    let ca = ClusterCa::generate(&args.ca_name).map_err(|e| e.to_string())?;
    let mut written = ca.write_dir(&args.out, &names).map_err(|e| e.to_string())?;
    if args.write_ca_key {
        written.push(ca.write_ca_key(&args.out).map_err(|e| e.to_string())?);
    }
    println!("CA {:?} and {} node certificate(s) written:", args.ca_name, names.len());
    for path in &written {
        println!("  {}", path.display());
    }
    println!("start a node with: --certs {} --name {}", args.out.display(), names[0]);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gen_certs: error: {e}");
            ExitCode::FAILURE
        }
    }
}
