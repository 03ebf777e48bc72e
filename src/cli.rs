//! What every keygate executable shares on its command line: the log flags.

use anyhow::Context;

/// Log line format.
#[derive(Copy, Clone, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// `--log-format` and `--log`, global to every subcommand.
#[derive(clap::Args, Debug)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,

    /// Log filter in `RUST_LOG` syntax, e.g. `info,keygate=debug`. The audit trail
    /// (target `keygate::audit`) is written at info whatever the level, unless the filter
    /// names it, e.g. `warn,keygate::audit=off`.
    #[arg(long, env = "KEYGATE_LOG", default_value = "info", global = true)]
    pub log: String,
}

impl LogArgs {
    /// Installs the process's tracing subscriber, writing to standard error.
    pub fn init(&self) -> anyhow::Result<()> {
        let mut filter = tracing_subscriber::EnvFilter::try_new(&self.log)
            .with_context(|| format!("invalid log filter {:?}", self.log))?;
        // A quieter log must not silence the audit trail by accident.
        if !self.log.contains(crate::audit::TARGET) {
            filter = filter.add_directive(format!("{}=info", crate::audit::TARGET).parse()?);
        }
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        match self.log_format {
            LogFormat::Plain => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
        Ok(())
    }
}
