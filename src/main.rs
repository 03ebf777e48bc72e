//! The `keygate` binary: one executable for every role, chosen by subcommand.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "keygate", version, about = "Machine-to-machine API authentication for Kubernetes")]
struct Cli {
    /// Log line format.
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,

    /// Log filter in `RUST_LOG` syntax, e.g. `info,keygate=debug`.
    #[arg(long, env = "KEYGATE_LOG", default_value = "info", global = true)]
    log: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions of every keygate resource as YAML.
    Crd,

    /// Print the `SHA256:` fingerprint of a PEM public key or PKCS#8 private key, as
    /// Snowflake's RSA_PUBLIC_KEY_FP shows it.
    Fingerprint {
        /// The PEM file, or `-` for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },

    /// Sign a Snowflake-style key-pair JWT with a client's private key and print it.
    KeypairJwt {
        /// The client's PKCS#8 PEM private key (`private_key.pem` of its Secret).
        #[arg(long, env = "KEYGATE_PRIVATE_KEY_FILE")]
        private_key: PathBuf,
        /// The client id (`client_id` of its Secret).
        #[arg(long, env = "KEYGATE_CLIENT_ID")]
        client_id: String,
        /// Optional `aud` claim.
        #[arg(long, env = "KEYGATE_AUDIENCE")]
        audience: Option<String>,
        /// Lifetime of the JWT; at most one hour.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        lifetime: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    keygate::api::parse_duration(text)
}

fn init_tracing(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("invalid log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn read_input(path: &PathBuf) -> anyhow::Result<String> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading standard input")?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log)?;
    match cli.command {
        Command::Crd => print!("{}", keygate::api::crds_yaml()?),
        Command::Fingerprint { file } => {
            println!("{}", keygate::credentials::fingerprint_pem(&read_input(&file)?)?);
        }
        Command::KeypairJwt { private_key, client_id, audience, lifetime } => {
            use keygate::credentials::{MAX_KEYPAIR_JWT_LIFETIME, SigningKey, sign_keypair_jwt, unix_now};
            if lifetime > MAX_KEYPAIR_JWT_LIFETIME {
                tracing::warn!(requested = ?lifetime, "key-pair JWT lifetime capped at one hour");
            }
            let key = SigningKey::from_pkcs8_pem(&read_input(&private_key)?)?;
            let jwt = sign_keypair_jwt(&key, &client_id, audience.as_deref(), lifetime, unix_now())?;
            println!("{jwt}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
